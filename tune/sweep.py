"""Sweep adapter hyperparameters with Ray Tune; each trial is a full `i2v train` run (the same TorchTrainer).

    python -m tune.sweep configs/smoke.yaml --space bottleneck --num-samples 2 --scheduler asha --out runs/sweep
    python -m tune.sweep CONFIG --space bottleneck --trial-set train.epochs=3   # short trials, full-length best.yaml

Ray 2.60 runs Train V2: a trial is a *driver* function that builds the TorchTrainer and forwards rank 0's per-epoch
metrics to Tune with `TuneReportCallback`, so ASHA can stop bad trials early (shared/SYSTEMS.md §5; the dashboard
from `ray[default]` is required, or finished trials leak their placement groups). Trial run names derive from the
trial id, so a restored sweep resumes each trial from its own checkpoints. Everything lands under `--out`:
the Tune experiment, one directory per trial (checkpoints, TensorBoard, summary.json), `results.csv`,
`results.md`, `best.yaml` (CONFIG + the best hyperparameters, ready for `i2v train`) and `sweep.png`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from i2v.cohort import is_member_key
from i2v.config import ConfigError, ExperimentCfg, load_config
from i2v.files import atomic_savefig, atomic_write
from tune.spaces import load_space, with_overrides

_logger = logging.getLogger(__name__)

WIDTH_KEYS = ("method.bottleneck", "method.side_width", "method.width")
# Trial drivers (one per running trial; they only build the TorchTrainer and relay metrics) need almost nothing, but
# they must not take a CPU of a GPU node that a worker needs: where a node declares this custom resource (Ray's docs'
# name; the head node of cluster/ray-cluster.yaml, or `ray start --resources='{"TRAIN_DRIVER_RESOURCE": 1}'`) drivers
# run there; otherwise each takes 0.01 CPU. A local cluster started by the sweep declares it itself.
DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"
DRIVER_SHARE = 0.01
# A trial whose workers cannot start retries this often (each wait: $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by
# default), then fails with Train's WorkerGroupStartupTimeoutError instead of waiting forever.
START_RETRIES = 2
ASHA_FACTOR = 2  # ASHA's reduction factor (grace period 1 epoch), also in-cohort halving's (--cohort)


@dataclass
class Plan:
    """How a sweep fits the cluster: `concurrency` trials at once, each `workers` x `worker` + `driver`."""

    trials: int
    concurrency: int
    workers: int
    worker: dict[str, float]
    driver: dict[str, float]
    cluster: dict[str, float]

    def describe(self) -> str:
        fmt = lambda d: ", ".join(f"{k} {v:g}" for k, v in d.items())  # noqa: E731
        return (
            f"{self.trials} trials, {self.concurrency} at a time; each trial: {self.workers} workers x "
            f"({fmt(self.worker)}) + a driver ({fmt(self.driver)}); cluster: {fmt(self.cluster)}"
        )


def sweep_metric(cfg: ExperimentCfg) -> tuple[str, str]:
    """(metric, mode) a sweep of `cfg` optimises (ASHA's rungs, the best trial, `best.yaml`): the per-epoch validation
    metric the task reports, `val_top1` for classification, T2V R@1 (`t2v_r1`, percent) for retrieval; both "max"."""
    return ("t2v_r1", "max") if cfg.task == "retrieval" else ("val_top1", "max")


def count_trials(param_space: dict, num_samples: int) -> int:
    """Tune runs every grid point `num_samples` times (random domains are sampled once per trial)."""
    return num_samples * math.prod(len(v["grid_search"]) for v in param_space.values() if _is_grid(v))


def _is_grid(v) -> bool:
    return isinstance(v, dict) and "grid_search" in v


def plan_sweep(nodes: list[dict[str, float]], cfg: ExperimentCfg, trials: int, max_concurrent: int | None) -> Plan:
    """The concurrency a cluster (`nodes`: each alive node's total resources) can hold without deadlock.

    Trials are admitted only while their workers *and* drivers all fit, placed node by node; a trial that does not fit
    the empty cluster is refused (ConfigError naming the numbers). `max_concurrent` above what fits is clamped: the
    extra trials could only wait for workers, time out and fail.
    """
    worker = {"CPU": float(cfg.train.cpus_per_worker)} | ({"GPU": 1.0} if cfg.train.use_gpu else {})
    has_driver_resource = any(n.get(DRIVER_RESOURCE, 0) >= DRIVER_SHARE for n in nodes)
    driver = {DRIVER_RESOURCE if has_driver_resource else "CPU": DRIVER_SHARE}
    cluster: dict[str, float] = {}
    for n in nodes:
        for k in ("CPU", "GPU", DRIVER_RESOURCE):
            if n.get(k):
                cluster[k] = cluster.get(k, 0) + n[k]
    plan = Plan(trials, 0, cfg.train.num_workers, worker, driver, cluster)
    while plan.concurrency < trials and _fits(
        nodes, [worker] * plan.workers * (plan.concurrency + 1), driver, plan.concurrency + 1
    ):
        plan.concurrency += 1
    if plan.concurrency == 0:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise ConfigError(
            f"a trial needs {plan.workers} workers x ({', '.join(f'{k} {v:g}' for k, v in worker.items())}) + "
            f"{DRIVER_SHARE:g} {next(iter(driver))} for its driver, but the cluster has "
            f"{', '.join(f'{k} {v:g}' for k, v in cluster.items()) or 'nothing'} over {len(nodes)} nodes (largest: "
            f"CPU {largest.get('CPU', 0):g}, GPU {largest.get('GPU', 0):g}); lower train.num_workers or "
            "train.cpus_per_worker (--set), or add nodes"
        )
    if max_concurrent is not None and max_concurrent > plan.concurrency:
        print(
            f"tune: warning: --max-concurrent {max_concurrent} clamped to {plan.concurrency}, what the cluster holds "
            "(more trials at once would only wait for workers that never start)",
            file=sys.stderr,
            flush=True,
        )
    elif max_concurrent is not None:
        plan.concurrency = max_concurrent
    return plan


def _fits(nodes: list[dict[str, float]], bundles: list[dict], driver: dict, drivers: int) -> bool:
    """Whether the worker bundles, then `drivers` driver bundles, fit the nodes (first fit; units of 1e-4 as Ray)."""
    free = [{k: round(v * 10_000) for k, v in n.items()} for n in nodes]
    for bundle in [*bundles, *[driver] * drivers]:
        need = {k: round(v * 10_000) for k, v in bundle.items()}
        node = next((f for f in free if all(f.get(k, 0) >= v for k, v in need.items())), None)
        if node is None:
            return False
        for k, v in need.items():
            node[k] -= v
    return True


def sample_configs(params: dict, num_samples: int, seed: int) -> list[dict]:
    """The configurations Tune would run, drawn up front (Tune's own variant generator: every grid point
    `num_samples` times, random domains resolved per sample), so that they can be grouped into cohorts."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.default_rng(seed)
    return [spec for _ in range(num_samples) for _, spec in generate_variants(params, random_state=rng)]


def group_cohorts(configs: list[dict], size: int) -> list[list[dict]]:
    """Configurations in cohorts of at most `size`: only configurations equal in every key a member may not set
    (`i2v.cohort.is_member_key`: anything but method.* and the optimiser keys) share a cohort; order is kept."""
    groups: dict[str, list[dict]] = {}
    for c in configs:
        shared = {k: v for k, v in c.items() if not is_member_key(k)}
        groups.setdefault(repr(sorted(shared.items())), []).append(c)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def cohort_config(base: dict, members: list[dict], halving: int, source: str) -> ExperimentCfg:
    """The experiment config of a cohort trial: the shared keys applied, one `train.cohort` entry per member."""
    shared = {k: v for k, v in members[0].items() if not is_member_key(k)}
    cohort = [{k: v for k, v in m.items() if is_member_key(k)} for m in members]
    return with_overrides(base, shared | {"train.cohort": cohort, "train.cohort_halving": halving}, source=source)


def trial_fn(
    params: dict,
    base: dict,
    trials_dir: str,
    cwd: str,
    verbose: bool = False,
    cohorts: list[list[dict]] | None = None,
    halving: int = 0,
) -> None:
    """One Tune trial: validate the trial's config, then train it exactly as `i2v train` would. With `cohorts`, the
    trial is the cohort `params["cohort"]`, its members halved in-cohort at the ASHA rungs when `halving` > 0."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from i2v.console import configure
    from i2v.train.driver import make_trainer, summarise, validate

    configure(verbose)
    os.chdir(cwd)  # Tune starts trials in their own directory; relative config paths mean the sweep's cwd

    source = f"trial {ray.tune.get_context().get_trial_id()}"
    if cohorts is None:
        cfg = with_overrides(base, params, source=source)
    else:
        cfg = cohort_config(base, cohorts[params["cohort"]], halving, source)
    cfg.train.checkpoint_every = 0  # ASHA's rungs are epochs: every report must carry validation metrics
    validate(cfg)
    out = Path(trials_dir) / f"train-{ray.tune.get_context().get_trial_id()}"  # stable across restores
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, out, callbacks=[TuneReportCallback()], verbose=verbose, start_retries=START_RETRIES)
    summarise(cfg, out, trainer.fit())


def check_out(out: str, address: str | None) -> None:
    """On a cluster, trials run on other nodes and write `--out` there: it must be a path every node shares."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not Path(out).is_absolute():
        raise ConfigError(
            f"--out: {out!r} is relative, but the sweep runs on the Ray cluster at {address}, whose trials write "
            "their checkpoints and results on other nodes; give an absolute path on storage every node mounts "
            "(e.g. /mnt/efs/sweeps/NAME)"
        )


def run_sweep(
    config: str,
    space: str,
    out: str | Path,
    *,
    overrides: list[str] = (),
    trial_overrides: list[str] = (),
    num_samples: int = 1,
    max_concurrent: int | None = None,
    max_failures: int = 1,
    scheduler: str = "asha",
    address: str | None = None,
    verbose: bool = False,
    cohort: int = 1,
) -> tuple[list[dict], int]:
    """Runs (or resumes) a sweep; writes and returns the results table (what finished, after a Ctrl-C too) and the
    number of trials left to run (0 unless interrupted). `cohort` > 1 trains the sampled configurations in cohorts of
    that many per trial (`group_cohorts`); the table still has one row per configuration."""
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from i2v.train.driver import init_ray, validate

    check_out(str(out), address)
    base = load_config(config, trial_overrides, defaults=overrides)  # --trial-set may replace a --set key
    params = load_space(space, base.method.name)
    validate(base)  # data and model problems fail here, before any trial
    metric, mode = sweep_metric(base)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"tune: sweep directory {out}", flush=True)
    cohorts = None
    if cohort > 1:
        cohorts = _cohorts(out, params, num_samples, cohort, base)
        params = {"cohort": ray.tune.grid_search(list(range(len(cohorts))))}  # one trial per cohort
        sizes = sorted({len(c) for c in cohorts})
        print(
            f"tune: {sum(map(len, cohorts))} configurations in {len(cohorts)} cohorts of {'/'.join(map(str, sizes))} "
            f"(one trial each; members see the same clips in the same order)",
            flush=True,
        )
    init_ray(address, verbose, resources={DRIVER_RESOURCE: 1})  # a local cluster: drivers take no CPU
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    plan = plan_sweep(nodes, base, count_trials(params, 1 if cohorts else num_samples), max_concurrent)
    print(
        f"tune: plan: {plan.describe()}; a failed trial restarts {max_failures}x; optimising {metric} ({mode})",
        flush=True,
    )
    halving = ASHA_FACTOR if scheduler == "asha" and cohorts and base.data.val_shards else 0
    trainable = ray.tune.with_resources(  # the trial driver itself needs (almost) nothing; its workers hold CPUs/GPUs
        ray.tune.with_parameters(
            trial_fn,
            base=base.to_dict(),
            trials_dir=str(out / "trials"),
            cwd=os.getcwd(),
            verbose=verbose,
            cohorts=cohorts,
            halving=halving,
        ),
        plan.driver,
    )
    if ray.tune.Tuner.can_restore(str(out / "tune")):
        print("tune: resuming the interrupted sweep", flush=True)
        tuner = ray.tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_errored=False)
    else:
        sched = (
            ASHAScheduler(time_attr="epoch", max_t=base.train.epochs, grace_period=1, reduction_factor=ASHA_FACTOR)
            if scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = ray.tune.Tuner(
            trainable,
            param_space=params,
            tune_config=ray.tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=num_samples,
                max_concurrent_trials=plan.concurrency,
                scheduler=sched,
            ),
            run_config=ray.tune.RunConfig(
                name="tune",
                storage_path=str(out),
                # A trial whose driver or node died restarts; its Train run resumes from its own checkpoints.
                failure_config=ray.tune.FailureConfig(max_failures=max_failures),
            ),
        )
    results = tuner.fit()  # Ctrl-C: Tune stops the trials, saves the experiment and returns what it has
    rows = results_table(results, base, cohorts)
    write_outputs(rows, out, load_config(config, list(overrides)))
    # Interrupted: trials stopped mid-run, and grid points Tune had not generated yet (they have no row at all).
    configs = sum(map(len, cohorts)) if cohorts else plan.trials
    left = sum(r["status"] == "unfinished" for r in rows) + max(0, configs - len(rows))
    if left:
        what = "configurations" if cohorts else "trials"
        print(f"tune: {left} of {configs} {what} not finished; run the same command again to resume", flush=True)
    return rows, left


def _cohorts(out: Path, params: dict, num_samples: int, size: int, base: ExperimentCfg) -> list[list[dict]]:
    """The sweep's cohorts, drawn once (seeded by train.seed) and kept in `out/cohorts.json`, so a restored sweep
    runs the same configurations."""
    path = out / "cohorts.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["size"] != size:
            raise ConfigError(f"--cohort: {size}, but the sweep in {out} was started with --cohort {saved['size']}")
        return saved["cohorts"]
    cohorts = group_cohorts(sample_configs(params, num_samples, base.train.seed), size)
    atomic_write(path, json.dumps({"size": size, "cohorts": cohorts}, indent=1) + "\n")
    return cohorts


def results_table(results, base: ExperimentCfg, cohorts: list[list[dict]] | None = None) -> list[dict]:
    """One row per configuration: its hyperparameters, best sweep metric of `base`'s task (`sweep_metric`, column
    `best_<metric>`), peak memory, clips/s, trainable params, status (a cohort trial gives one row per member, and
    the `cohort` column names the trial its members shared); best first."""
    from i2v.backbone import load_backbone
    from i2v.tasks import get_task

    def create_model(cfg: ExperimentCfg, device: str):  # the task's model (retrieval: + text tower, WTI)
        return get_task(cfg).build_model(cfg, load_backbone(cfg.backbone, device=device))

    metric = sweep_metric(base)[0]

    # A Result carries no trial status, and a restored experiment may hold a finished trial's last result from before
    # its final report (no `done`): Tune's own trial status is the record (a private attribute, hence the fallback).
    status = {t.path: t.status for t in getattr(getattr(results, "_experiment_analysis", None), "trials", [])}
    rows = []
    for r in results:
        done = status.get(r.path) == "TERMINATED" or bool((r.metrics or {}).get("done"))
        df = r.metrics_dataframe
        trial = {
            "trial": _trial_id(r.path),
            "status": "failed" if r.error else "ok" if done else "unfinished",
            "error": _first_line(r.error) if r.error else "",
        }
        if cohorts is None:
            rows.append(_row(trial, dict(r.config or {}), df, "", base, create_model, metric))
            continue
        for k, params in enumerate(cohorts[(r.config or {})["cohort"]]):
            row = _row(trial, params, df, f"m{k}/", base, create_model, metric)
            rows.append({"trial": f"{row.pop('trial')}/m{k}", "cohort": trial["trial"], **row})
    best = f"best_{metric}"
    rows.sort(key=lambda row: -math.inf if row[best] is None else row[best], reverse=True)
    return rows


def _row(trial: dict, params: dict, df, prefix: str, base: ExperimentCfg, create_model, metric: str) -> dict:
    """A results row from a trial's metrics (`prefix`: a cohort member's `m{k}/` keys)."""
    val = f"{prefix}{metric}"
    has = df is not None and val in df and df[val].notna().any()
    trainable = None
    try:
        model = create_model(with_overrides(base.to_dict(), params), device="meta")
        trainable = sum(p.numel() for p in model.trainable_parameters())
    except Exception:  # an invalid hyperparameter combination: the trial's error says why
        pass
    status, error, epochs = trial["status"], trial["error"], int(df["epoch"].max()) if has else 0
    member_status = df[f"{prefix}status"].iloc[-1] if prefix and has and f"{prefix}status" in df else None
    stopped_at = int(df[f"{prefix}stopped_at"].iloc[-1]) if member_status in ("stopped", "diverged") else None
    if member_status == "stopped":  # in-cohort halving: the member's last epoch was its rung
        epochs = stopped_at
    elif member_status == "diverged" and status != "failed":
        status, error = "diverged", f"non-finite gradient at step {stopped_at}; dropped from its cohort"
    return {
        "trial": trial["trial"],
        "status": status,
        **params,
        f"best_{metric}": float(df[val].max()) if has else None,
        "epochs": epochs,
        "peak_mem_mb": float(df["peak_mem_mb"].max()) if has else None,
        "train_clips_per_s": float(df["train_clips_per_s"].iloc[-1]) if has else None,
        "trainable_params": trainable,
        "error": error,
    }


def _trial_id(path: str | None) -> str:
    """Tune's trial id ("c5a6f_00003") from a trial directory name ("trial_fn_c5a6f_00003_3_method...")."""
    m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path or "").name)
    return m.group(1) if m else Path(path or "?").name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    key = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(error))
    return f"{type(error).__name__}: {key.strip()}"[:300]


def write_csv(rows: list[dict], path: Path) -> list[str]:
    """Writes `rows` as CSV atomically, columns in first-seen order; returns the columns."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())
    return keys


def write_outputs(rows: list[dict], out: Path, best_base: ExperimentCfg) -> None:
    """results.csv, results.md (also printed), best.yaml and sweep.png, each written atomically; rows ranked by
    `best_base`'s sweep metric (`sweep_metric`)."""
    metric = sweep_metric(best_base)[0]
    keys = write_csv(rows, out / "results.csv")
    md = markdown(rows, keys)
    if any("cohort" in r for r in rows):
        md += (
            "\n\nRows with the same `cohort` trained together, on one backbone forward per batch: they saw the same "
            "clips, augmentations and order, so differences between them are paired comparisons (common random "
            "numbers), free of data-order noise. Under ASHA a cohort's members are also halved inside the cohort at "
            "its rungs (`stopped` members keep the epochs they reached)."
        )
    atomic_write(out / "results.md", md + "\n")
    print(md, flush=True)
    ok = [r for r in rows if r["status"] == "ok" and r[f"best_{metric}"] is not None]
    if ok:
        best = ok[0]
        params = {k: best[k] for k in keys if "." in k}
        cfg = with_overrides(best_base.to_dict(), params, source="best trial")
        header = f"# Best trial {best['trial']} of the sweep in {out} ({metric} {best[f'best_{metric}']:.4f}).\n"
        atomic_write(out / "best.yaml", header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(f"tune: best config written to {out / 'best.yaml'} ({params})", flush=True)
    plot(rows, out / "sweep.png", metric)


def markdown(rows: list[dict], keys: list[str]) -> str:
    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
            return f"{v:,}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, metric: str = "val_top1") -> None:
    """Accuracy and peak memory against the bottleneck / side-network width (one marker per learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_key = next((k for k in WIDTH_KEYS if any(k in r for r in rows)), None)
    ok = [r for r in rows if r["status"] == "ok" and r[f"best_{metric}"] is not None]
    series: dict[str, list[dict]] = {}  # one line per learning rate (or one line for all)
    for r in ok:
        lr = r.get("train.lr")
        series.setdefault(f"lr {lr:.2g}" if isinstance(lr, float) else "trials", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.get(width_key, 0) if width_key else 0)
        x = [r.get(width_key, i) if width_key else i for i, r in enumerate(rs)]
        ax1.plot(x, [r[f"best_{metric}"] for r in rs], "o-", label=label)
        ax2.plot(x, [r["peak_mem_mb"] for r in rs], "o-", label=label)
    for ax, title in ((ax1, f"best {metric}"), (ax2, "peak memory per worker (MB)")):
        ax.set_xlabel(width_key or "trial")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if series:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--space", required=True, help="a named space in tune/spaces/ (e.g. bottleneck) or a YAML path")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the space (each grid point runs this often)")
    p.add_argument(
        "--max-concurrent", type=int, default=None, help="trials at once (default and maximum: what the cluster holds)"
    )
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial (a lost node or driver)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument(
        "--cohort",
        type=int,
        default=1,
        metavar="K",
        help="train up to K compatible configurations per trial on one backbone forward (default 1: one per trial)",
    )
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<config>-<space>); reused: resume")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for trials and best.yaml")
    p.add_argument("--trial-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for trials only")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true", help="Ray's and the libraries' logs; tracebacks on bad input")
    args = p.parse_args(argv)
    if args.num_samples < 1 or (args.max_concurrent is not None and args.max_concurrent < 1) or args.max_failures < 0:
        p.error("--num-samples and --max-concurrent must be >= 1, --max-failures >= 0")
    if args.cohort < 1:
        p.error("--cohort must be >= 1")
    out = args.out or f"runs/sweep-{Path(args.config).stem}-{Path(args.space).stem}"
    from i2v.console import configure

    configure(args.verbose)
    try:
        _, left = run_sweep(
            args.config,
            args.space,
            out,
            overrides=args.set,
            trial_overrides=args.trial_set,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent,
            max_failures=args.max_failures,
            scheduler=args.scheduler,
            address=args.address,
            verbose=args.verbose,
            cohort=args.cohort,
        )
    except (ValueError, FileNotFoundError) as e:  # bad input (ConfigError is a ValueError): one line, exit 2
        if args.verbose:
            raise
        print(f"tune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C skips Tune's graceful stop
        print("tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 130 if left else 0


if __name__ == "__main__":
    sys.exit(main())
