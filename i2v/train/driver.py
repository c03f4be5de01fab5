"""The driver behind `i2v train`: validate the config, attach to (or start) Ray, run a `TorchTrainer`, summarise.

Re-running with the same run directory resumes from its latest checkpoint (Ray Train V2 restores a run by its name
and storage path), which is how `i2v train` resumes a run by name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from i2v.config import ConfigError, ExperimentCfg
from i2v.files import atomic_write

_logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("val_top1", "val_top5", "epoch", "train_clips_per_s", "peak_mem_mb")


def validate(cfg: ExperimentCfg) -> None:
    """Everything that can be checked before a worker starts: the model builds (on meta), shards exist."""
    from i2v.backbone import load_backbone
    from i2v.data import expand_shards, read_label_map
    from i2v.tasks import get_task

    if cfg.train.num_workers < 1:
        raise ConfigError(f"train.num_workers: {cfg.train.num_workers} must be >= 1")
    if cfg.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps: {cfg.train.accum_steps} must be >= 1")
    if getattr(cfg.method, "sync_bn", False) and not cfg.train.use_gpu:
        raise ConfigError(
            "method.sync_bn: true needs GPU workers (train.use_gpu: true); torch's SyncBatchNorm does not train on CPU"
        )
    from i2v.cohort import member_configs

    if cfg.train.cohort and cfg.task != "classification":
        raise ConfigError(f"train.cohort: cohorts train classification side networks, not task {cfg.task!r}")
    try:
        for member in member_configs(cfg):  # [cfg] unless it is a cohort
            get_task(member).build_model(member, load_backbone(member.backbone, device="meta"))
    except (ValueError, KeyError, NotImplementedError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if cfg.task == "retrieval":
        from i2v.tasks.retrieval import validate_data

        validate_data(cfg)
        return
    for key in ("train_shards", "val_shards"):
        pattern = getattr(cfg.data, key)
        if not pattern:
            if key == "train_shards":
                raise ConfigError(
                    "data.train_shards: empty; give a shard pattern such as data/train/{000000..000009}.tar"
                )
            continue
        try:
            expand_shards(pattern)  # pack output directories and globs resolved; local shards must exist
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.{key}: {e}") from None
    if cfg.data.train_shards:
        try:
            labels = read_label_map(cfg.data.train_shards)
        except (OSError, ValueError):  # no label map to compare with (e.g. pipe: URLs)
            labels = None
        if labels is not None and len(labels) != cfg.data.num_classes:
            raise ConfigError(
                f"data.num_classes: {cfg.data.num_classes}, but the label map next to the shards has "
                f"{len(labels)} classes"
            )
        if labels is not None and cfg.data.flip and cfg.data.flip_label_pairs:
            from i2v.data.wds import flip_label_map

            try:
                flip_label_map(cfg.data.flip_label_pairs, labels)  # every name must be a class of the shards
            except ValueError as e:
                raise ConfigError(str(e)) from None


def init_ray(address: str | None, verbose: bool = False, resources: dict | None = None) -> None:
    """Attaches to `address` ($RAY_ADDRESS), else starts a private local cluster declaring custom `resources`."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {} if verbose else {"logging_level": logging.WARNING}  # no "Started a local Ray instance" banner
    if address:  # an existing cluster (`ray job submit` sets RAY_ADDRESS): its runtime env and resources as they are
        ray.init(address=address, **quiet)
    else:  # a new local single-node cluster for this run (never a stray one); workers inherit this environment
        # No node can be preempted here; Train's preemption watcher would only log a core-worker error per run.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", resources=resources, **quiet)


def make_trainer(
    cfg: ExperimentCfg,
    out: Path,
    progress: bool = False,
    callbacks: list | tuple = (),
    verbose: bool = False,
    start_retries: int = -1,
):
    """The `TorchTrainer` of one run: Ray Train names the run after `out` and stores it in `out.parent`, so the same
    `out` resumes it. Used by `run_training` and by Tune trials (which add `TuneReportCallback`).

    `start_retries`: how often a worker group that could not start (`WorkerGroupStartupTimeoutError`, after
    $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s) is retried before the run fails; -1: forever (a cluster
    that autoscales may take minutes to add nodes)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from i2v.train.loop import train_fn_per_worker

    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    loop_config = {"cfg": cfg.to_dict(), "run_dir": str(out), "cwd": os.getcwd(), "progress": progress}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config | {"verbose": verbose},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=start_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks) or None,
            # Ray Train's own INFO lines (every report of every rank, worker-group start) only with --verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )


def summarise(cfg: ExperimentCfg, out: Path, result) -> dict:
    """Writes `out/summary.json` and `out/final.pt` (a copy of the last checkpoint's state) from a Ray Result; for a
    cohort, `out/members/NN/{summary.json,final.pt}` per member (each what that member's solo run would have written)
    and `out/summary.json` with one row per member under "members"."""
    if result.error is not None:
        raise result.error
    from i2v.backbone import resolve_backbone

    metrics = dict(result.metrics or {})
    summary = {k: metrics.get(k) for k in SUMMARY_KEYS if cfg.task == "classification" or k in metrics} | {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "partition": cfg.backbone.partition,
        # what the tower was built with (a ZeRO-3 worker refuses to run on any dtype but backbone.precision)
        "backbone_resolved": {"precision": cfg.backbone.precision} | resolve_backbone(cfg.backbone, False).summary(),
        "steps": metrics.get("step"),
        "run_dir": str(out),
    }
    if cfg.task == "retrieval":  # the ten figures, counts, final vs best epoch (summary of eval/epoch_*.json)
        from i2v.tasks.retrieval import run_summary

        summary |= run_summary(cfg, out, metrics)
    if cfg.train.cohort:
        summary |= {"cohort": len(cfg.train.cohort), "members": _summarise_members(cfg, out, result, summary)}
        summary.pop("method")
    else:
        if cfg.task == "classification":
            summary["val_per_class"] = _per_class(out)
        if result.checkpoint is not None:
            final = out / "final.pt"
            shutil.copyfile(Path(result.checkpoint.path) / "state.pt", final.with_suffix(".pt.tmp"))
            os.replace(final.with_suffix(".pt.tmp"), final)
            summary["checkpoint"] = str(final)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _per_class(run_dir: Path) -> list[float] | None:
    latest = run_dir / "eval" / "latest.json"  # per-class accuracy is not reported through Ray (scalars only)
    return json.loads(latest.read_text())["val_per_class"] if latest.is_file() else None


def _summarise_members(cfg: ExperimentCfg, out: Path, result, shared: dict) -> list[dict]:
    """One summary per cohort member, written to its own directory with its final checkpoint (a solo run's layout,
    so `i2v eval --checkpoint out/members/NN/final.pt` works as for any run)."""
    import torch

    from i2v.cohort import member_configs
    from i2v.train.checkpoint import atomic_save
    from i2v.train.loop import member_dir

    metrics = dict(result.metrics or {})
    state = None
    if result.checkpoint is not None:
        state = torch.load(Path(result.checkpoint.path) / "state.pt", map_location="cpu", weights_only=False)
    rows = []
    for k, (member, overrides) in enumerate(zip(member_configs(cfg), cfg.train.cohort, strict=True)):
        d = member_dir(out, k)
        d.mkdir(parents=True, exist_ok=True)
        status, stopped_at = metrics.get(f"m{k}/status"), metrics.get(f"m{k}/stopped_at", -1)
        status = "ok" if status == "training" else status  # trained to the end
        row = {key: metrics.get(f"m{k}/{key}") for key in ("val_top1", "val_top5")} | {
            "member": k,
            "overrides": overrides,
            "status": status,
            # epochs trained: a stopped member's rung; a diverged one's weights are from before `stopped_at` (a step)
            "epoch": stopped_at if status == "stopped" else metrics.get("epoch"),
            "diverged_at_step": stopped_at if status == "diverged" else None,
        }
        row |= {k2: v for k2, v in shared.items() if k2 not in row and k2 not in ("val_top1", "val_top5", "epoch")}
        row |= {"method": member.method.name, "run_dir": str(d), "val_per_class": _per_class(d)}
        if state is not None:
            saved = state["members"][k]
            final = d / "final.pt"
            atomic_save(
                {"model": saved["model"], "cfg": member.to_dict()} | {x: state[x] for x in ("epoch", "step")}, final
            )
            row["checkpoint"] = str(final)
        atomic_write(d / "summary.json", json.dumps(row, indent=2) + "\n")
        rows.append(row)
    return rows


def run_training(
    cfg: ExperimentCfg, out: str | Path, address: str | None = None, progress: bool = True, verbose: bool = False
) -> dict:
    """Trains `cfg` with Ray Train; returns (and writes to `out/summary.json`) the final figures."""
    validate(cfg)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"i2v: run directory {out}", flush=True)
    init_ray(address, verbose)
    return summarise(cfg, out, make_trainer(cfg, out, progress, verbose=verbose).fit())


def format_summary(summary: dict) -> str:
    from i2v.tasks.retrieval import SUMMARY_KEYS as RETRIEVAL_KEYS

    if "members" in summary:  # a cohort: one line per member
        lines = [
            f"cohort of {summary['cohort']}, {summary['steps']} steps, {summary['partition']}, run {summary['run_dir']}"
        ]
        for r in summary["members"]:
            val = "-" if r["val_top1"] is None else f"{r['val_top1']:.4f}"
            lines.append(f"member {r['member']}  {r['status']:9s} val_top1 {val}  epoch {r['epoch']}  {r['overrides']}")
        return "\n".join(lines)
    keys = (*RETRIEVAL_KEYS, "chance_r1", *SUMMARY_KEYS[2:]) if "t2v_r1" in summary else SUMMARY_KEYS
    rows = [(k, summary.get(k)) for k in (*keys, "steps", "method", "partition", "checkpoint")]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in rows)
