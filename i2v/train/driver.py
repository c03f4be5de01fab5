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
    from i2v.data import expand_shards, read_label_map
    from i2v.methods import create_model

    if cfg.train.num_workers < 1:
        raise ConfigError(f"train.num_workers: {cfg.train.num_workers} must be >= 1")
    if cfg.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps: {cfg.train.accum_steps} must be >= 1")
    try:
        create_model(cfg, device="meta")
    except (ValueError, KeyError, NotImplementedError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
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


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster (`ray job submit` sets RAY_ADDRESS): its runtime env and resources as they are
        ray.init(address=address)
    else:  # a new local single-node cluster for this run (never a stray one); workers inherit this environment
        ray.init(address="local")


def make_trainer(cfg: ExperimentCfg, out: Path, progress: bool = False, callbacks: list | tuple = ()):
    """The `TorchTrainer` of one run: Ray Train names the run after `out` and stores it in `out.parent`, so the same
    `out` resumes it. Used by `run_training` and by Tune trials (which add `TuneReportCallback`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from i2v.train.loop import train_fn_per_worker

    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(out), "cwd": os.getcwd(), "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks) or None,
        ),
    )


def summarise(cfg: ExperimentCfg, out: Path, result) -> dict:
    """Writes `out/summary.json` and `out/final.pt` (a copy of the last checkpoint's state) from a Ray Result."""
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    summary = {k: metrics.get(k) for k in SUMMARY_KEYS} | {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "partition": cfg.backbone.partition,
        "steps": metrics.get("step"),
        "val_per_class": metrics.get("val_per_class"),
        "run_dir": str(out),
    }
    if result.checkpoint is not None:
        final = out / "final.pt"
        shutil.copyfile(Path(result.checkpoint.path) / "state.pt", final.with_suffix(".pt.tmp"))
        os.replace(final.with_suffix(".pt.tmp"), final)
        summary["checkpoint"] = str(final)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_training(cfg: ExperimentCfg, out: str | Path, address: str | None = None, progress: bool = True) -> dict:
    """Trains `cfg` with Ray Train; returns (and writes to `out/summary.json`) the final figures."""
    validate(cfg)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"i2v: run directory {out}", flush=True)
    init_ray(address)
    return summarise(cfg, out, make_trainer(cfg, out, progress).fit())


def format_summary(summary: dict) -> str:
    rows = [(k, summary.get(k)) for k in (*SUMMARY_KEYS, "steps", "method", "partition", "checkpoint")]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in rows)
