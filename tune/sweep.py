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
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from i2v.config import ConfigError, ExperimentCfg, load_config
from i2v.files import atomic_write
from tune.spaces import load_space, with_overrides

_logger = logging.getLogger(__name__)

WIDTH_KEYS = ("method.bottleneck", "method.side_width", "method.width")


def trial_fn(params: dict, base: dict, trials_dir: str, cwd: str) -> None:
    """One Tune trial: validate the trial's config, then train it exactly as `i2v train` would."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from i2v.train.driver import make_trainer, summarise, validate

    os.chdir(cwd)  # Tune starts trials in their own directory; relative config paths mean the sweep's cwd

    cfg = with_overrides(base, params, source=f"trial {ray.tune.get_context().get_trial_id()}")
    cfg.train.checkpoint_every = 0  # ASHA's rungs are epochs: every report must carry validation metrics
    validate(cfg)
    out = Path(trials_dir) / f"train-{ray.tune.get_context().get_trial_id()}"  # stable across restores
    out.mkdir(parents=True, exist_ok=True)
    summarise(cfg, out, make_trainer(cfg, out, callbacks=[TuneReportCallback()]).fit())


def run_sweep(
    config: str,
    space: str,
    out: str | Path,
    *,
    overrides: list[str] = (),
    trial_overrides: list[str] = (),
    num_samples: int = 1,
    max_concurrent: int = 2,
    scheduler: str = "asha",
    address: str | None = None,
) -> list[dict]:
    """Runs (or resumes) a sweep; writes and returns the results table."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from i2v.train.driver import init_ray, validate

    base = load_config(config, trial_overrides, defaults=overrides)  # --trial-set may replace a --set key
    params = load_space(space, base.method.name)
    validate(base)  # data and model problems fail here, before any trial
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"tune: sweep directory {out}", flush=True)
    init_ray(address)
    trainable = ray.tune.with_resources(  # the trial driver itself needs (almost) nothing; its workers hold CPUs/GPUs
        ray.tune.with_parameters(trial_fn, base=base.to_dict(), trials_dir=str(out / "trials"), cwd=os.getcwd()),
        {"cpu": 0.01},
    )
    if ray.tune.Tuner.can_restore(str(out / "tune")):
        print("tune: resuming the interrupted sweep", flush=True)
        tuner = ray.tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_errored=False)
    else:
        sched = (
            ASHAScheduler(time_attr="epoch", max_t=base.train.epochs, grace_period=1, reduction_factor=2)
            if scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = ray.tune.Tuner(
            trainable,
            param_space=params,
            tune_config=ray.tune.TuneConfig(
                metric="val_top1",
                mode="max",
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                scheduler=sched,
            ),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=str(out), failure_config=ray.tune.FailureConfig(max_failures=0)
            ),
        )
    results = tuner.fit()
    rows = results_table(results, base)
    write_outputs(rows, out, load_config(config, list(overrides)))
    return rows


def results_table(results, base: ExperimentCfg) -> list[dict]:
    """One row per trial: its hyperparameters, best val top-1, peak memory, clips/s, trainable params, status."""
    from i2v.methods import create_model

    rows = []
    for r in results:
        params = {k: v for k, v in (r.config or {}).items()}
        df = r.metrics_dataframe
        has = df is not None and "val_top1" in df
        trainable = None
        try:
            model = create_model(with_overrides(base.to_dict(), params), device="meta")
            trainable = sum(p.numel() for p in model.trainable_parameters())
        except Exception:  # an invalid hyperparameter combination: the trial's error says why
            pass
        rows.append(
            {
                "trial": _trial_id(r.path),
                "status": "failed" if r.error else "ok",
                **params,
                "best_val_top1": float(df["val_top1"].max()) if has else None,
                "epochs": int(df["epoch"].max()) if has else 0,
                "peak_mem_mb": float(df["peak_mem_mb"].max()) if has else None,
                "train_clips_per_s": float(df["train_clips_per_s"].iloc[-1]) if has else None,
                "trainable_params": trainable,
                "error": _first_line(r.error) if r.error else "",
            }
        )
    rows.sort(key=lambda row: -1 if row["best_val_top1"] is None else row["best_val_top1"], reverse=True)
    return rows


def _trial_id(path: str | None) -> str:
    """Tune's trial id ("c5a6f_00003") from a trial directory name ("trial_fn_c5a6f_00003_3_method...")."""
    m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path or "").name)
    return m.group(1) if m else Path(path or "?").name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    key = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(error))
    return f"{type(error).__name__}: {key.strip()}"[:300]


def write_outputs(rows: list[dict], out: Path, best_base: ExperimentCfg) -> None:
    """results.csv, results.md (also printed), best.yaml and sweep.png, each written atomically."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", table.getvalue())
    md = markdown(rows, keys)
    atomic_write(out / "results.md", md + "\n")
    print(md, flush=True)
    ok = [r for r in rows if r["status"] == "ok" and r["best_val_top1"] is not None]
    if ok:
        best = ok[0]
        params = {k: best[k] for k in keys if "." in k}
        cfg = with_overrides(best_base.to_dict(), params, source="best trial")
        header = f"# Best trial {best['trial']} of the sweep in {out} (val top-1 {best['best_val_top1']:.4f}).\n"
        atomic_write(out / "best.yaml", header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(f"tune: best config written to {out / 'best.yaml'} ({params})", flush=True)
    plot(rows, out / "sweep.png")


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


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy and peak memory against the bottleneck / side-network width (one marker per learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_key = next((k for k in WIDTH_KEYS if any(k in r for r in rows)), None)
    ok = [r for r in rows if r["status"] == "ok" and r["best_val_top1"] is not None]
    series: dict[str, list[dict]] = {}  # one line per learning rate (or one line for all)
    for r in ok:
        lr = r.get("train.lr")
        series.setdefault(f"lr {lr:.2g}" if isinstance(lr, float) else "trials", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.get(width_key, 0) if width_key else 0)
        x = [r.get(width_key, i) if width_key else i for i, r in enumerate(rs)]
        ax1.plot(x, [r["best_val_top1"] for r in rs], "o-", label=label)
        ax2.plot(x, [r["peak_mem_mb"] for r in rs], "o-", label=label)
    for ax, title in ((ax1, "best val top-1"), (ax2, "peak memory per worker (MB)")):
        ax.set_xlabel(width_key or "trial")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if series:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--space", required=True, help="a named space in tune/spaces/ (e.g. bottleneck) or a YAML path")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the space (grid values multiply)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (GPUs // workers per trial)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<config>-<space>); reused: resume")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for trials and best.yaml")
    p.add_argument("--trial-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for trials only")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    out = args.out or f"runs/sweep-{Path(args.config).stem}-{Path(args.space).stem}"
    try:
        run_sweep(
            args.config,
            args.space,
            out,
            overrides=args.set,
            trial_overrides=args.trial_set,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent,
            scheduler=args.scheduler,
            address=args.address,
        )
    except ConfigError as e:
        print(f"tune: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
