"""Few-shot and data-efficient protocol runs: every (config, K or p, seed) as one Ray Tune grid, reported as mean ± std.

    python -m tune.fewshot configs/experiments/*_fewshot-vificlip_hmdb51.yaml --source data/hmdb51/train1 \\
        --shots 2 4 8 16 --repeats 3 --out runs/fewshot-hmdb51
    python -m tune.fewshot CONFIG --source data/ssv2/train --percent 0.1 0.2 0.5 --rule random --repeats 3 --out DIR
    python -m tune.fewshot CONFIG --source data/ucf101/train1 --lists 2=train1_few_shot_2.txt 4=... --repeats 3

For each amount (K shots, or fraction p) and seed, the driver first draws the training subset from the pack
`--source` with `i2v data subset`'s rules (`OUT/subsets/k{K}-s{seed}/`; with `--lists`, one imported list per K and
the seed varies only training). Each trial then trains one config on one subset exactly as `i2v train` would (the
same TorchTrainer, `train.seed` = the seed) and evaluates on the config's `data.val_shards` (the full test split).

Epoch semantics (`--epochs`): `true` = an epoch is one pass over the K x C clips (X-CLIP / ViFi-CLIP); `repeat` =
Side4Video's `data.shot`: the subset repeated `N // (K x C)` times, so an epoch has about the full data's length
(`data.epoch_clips` = that many clips). The reported figure (`--metric`): `final` = the last epoch's validation,
`best` = the best epoch's (ViFi-CLIP logs the maximum). Each trial's `summary.json` gains a "protocol" record: K or p,
seed, subset rule, list path and SHA-256, epoch semantics and clips per epoch, test shards and their clip count, views.

Under `--out`: the Tune experiment, `trials/train-<id>/` per trial, `results.csv` (one row per trial), `results.md`
and `protocol.json` (the `K x method` table: mean ± sample std over the seeds, n), and `fewshot.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from i2v.config import ConfigError, load_config
from i2v.data.subset import PERCENT_RULES
from i2v.files import atomic_savefig, atomic_write
from tune.spaces import with_overrides

_logger = logging.getLogger(__name__)


def trial_fn(
    params: dict, bases: list[dict], labels: list[str], subsets: dict, protocol: dict, trials_dir: str, cwd: str
) -> None:
    """One trial: config `params["config"]` trained on the subset of (amount, seed), then the protocol recorded."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from i2v.data import count_samples
    from i2v.train.driver import make_trainer, summarise, validate

    os.chdir(cwd)
    trial = ray.tune.get_context().get_trial_id()
    amount, seed = params["amount"], params["seed"]
    sub = subsets[f"{amount}/{seed}"]
    epoch_clips = 0 if protocol["epochs"] == "true" else sub["samples"] * (sub["source_samples"] // sub["samples"])
    cfg = with_overrides(
        bases[params["config"]],
        {"data.train_shards": sub["dir"], "train.seed": seed, "data.epoch_clips": epoch_clips},
        source=f"trial {trial}",
    )
    cfg.train.checkpoint_every = 0  # every report carries validation metrics
    validate(cfg)
    out = Path(trials_dir) / f"train-{trial}"  # stable across restores
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(cfg, out, make_trainer(cfg, out, callbacks=[TuneReportCallback()]).fit())
    summary["protocol"] = {
        "method": labels[params["config"]],
        protocol["amount"]: amount,
        "seed": seed,
        "subset": sub["dir"],
        "rule": sub["rule"],
        "list": sub["list"],
        "list_sha256": sub["list_sha256"],
        "train_clips": sub["samples"],
        "epochs": protocol["epochs"],
        "epoch_clips": epoch_clips or sub["samples"],
        "train_epochs": cfg.train.epochs,
        "test": cfg.data.val_shards,
        "test_clips": count_samples(cfg.data.val_shards),
        "views": cfg.data.test_clips * cfg.data.test_crops,
        "test_clips_x_crops": [cfg.data.test_clips, cfg.data.test_crops],
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def draw_subsets(source: str, out: Path, amounts: list, seeds: list[int], kind: str, rule: str, lists: dict) -> dict:
    """Writes one subset per (amount, seed) under out/subsets; returns {"amount/seed": record + dir + samples}."""
    from i2v.data.subset import make_subset

    subsets = {}
    for amount in amounts:
        for seed in seeds:
            if lists:  # one fixed list per K: the seed varies training only
                name = f"k{amount}-list"
                kwargs = {"list_path": lists[amount]}
            elif kind == "shots":
                name, kwargs = f"k{amount}-s{seed}", {"shots": amount, "seed": seed}
            else:
                name, kwargs = f"p{amount}-{rule}-s{seed}", {"percent": amount, "rule": rule, "seed": seed}
            dst = out / "subsets" / name
            record = make_subset(source, dst, **kwargs)
            index = json.loads((dst / "index.json").read_text())
            subsets[f"{amount}/{seed}"] = record | {
                "dir": str(dst),
                "samples": index["samples"],
                "list": str(dst / "list.txt"),
            }
    return subsets


def run_protocol(
    configs: list[str],
    source: str,
    out: str | Path,
    *,
    shots: list[int] = (),
    percent: list[float] = (),
    rule: str = "random",
    lists: dict[int, str] | None = None,
    seeds: list[int] = (0, 1, 2),
    epochs: str = "true",
    metric: str = "final",
    overrides: list[str] = (),
    max_concurrent: int = 2,
    address: str | None = None,
) -> list[dict]:
    """Runs (or resumes) the protocol grid; writes and returns the per-trial rows."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler

    from i2v.train.driver import init_ray, validate

    if bool(shots) + bool(percent) + bool(lists) != 1:
        raise ConfigError("give exactly one of --shots, --percent, --lists")
    if epochs not in ("true", "repeat") or metric not in ("final", "best"):
        raise ConfigError(f"--epochs {epochs!r} / --metric {metric!r}: expected true|repeat and final|best")
    kind = "percent" if percent else "shots"
    amounts = list(percent or shots or sorted(lists))
    bases = [load_config(c, list(overrides)) for c in configs]
    labels = method_labels(configs, [b.method.name for b in bases])
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"fewshot: protocol directory {out}", flush=True)
    try:
        subsets = draw_subsets(source, out, amounts, list(seeds), kind, rule, lists or {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"--source {source}: {e}") from None
    first = next(iter(subsets.values()))["dir"]
    for base in bases:  # data and model problems fail here, before any trial
        validate(with_overrides(base.to_dict(), {"data.train_shards": first}, source="protocol"))
    protocol = {"amount": kind, "epochs": epochs, "metric": metric}
    init_ray(address)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            trial_fn,
            bases=[b.to_dict() for b in bases],
            labels=labels,
            subsets=subsets,
            protocol=protocol,
            trials_dir=str(out / "trials"),
            cwd=os.getcwd(),
        ),
        {"cpu": 0.01},
    )
    if ray.tune.Tuner.can_restore(str(out / "tune")):
        print("fewshot: resuming the interrupted protocol run", flush=True)
        tuner = ray.tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={
                "config": ray.tune.grid_search(list(range(len(configs)))),
                "amount": ray.tune.grid_search(amounts),
                "seed": ray.tune.grid_search(list(seeds)),
            },
            tune_config=ray.tune.TuneConfig(
                metric="val_top1", mode="max", max_concurrent_trials=max_concurrent, scheduler=FIFOScheduler()
            ),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=str(out), failure_config=ray.tune.FailureConfig(max_failures=0)
            ),
        )
    results = tuner.fit()
    summaries = read_summaries(out / "trials", kind)
    rows = [trial_row(r, labels, kind, summaries) for r in results]
    write_outputs(rows, out, kind, metric, protocol)
    return rows


def method_labels(configs: list[str], methods: list[str]) -> list[str]:
    """Column names: the method, or the config's file name where two configs share a method."""
    return [m if methods.count(m) == 1 else Path(c).stem for c, m in zip(configs, methods, strict=True)]


def trial_row(result, labels: list[str], kind: str, summaries: dict) -> dict:
    """One trial: its grid point, final and best validation figures, and the protocol record of its summary."""
    params = result.config or {}
    method = labels[params["config"]] if "config" in params else "?"
    df = result.metrics_dataframe
    has = df is not None and "val_top1" in df
    summary = summaries.get((method, params.get("amount"), params.get("seed")), {})
    rec = summary.get("protocol", {})
    return {
        "method": method,
        kind: params.get("amount"),
        "seed": params.get("seed"),
        "status": "failed" if result.error else "ok",
        "val_top1": summary.get("val_top1"),
        "val_top5": summary.get("val_top5"),
        "best_val_top1": float(df["val_top1"].max()) if has else None,
        "epochs": int(df["epoch"].max()) if has else 0,
        "train_clips": rec.get("train_clips"),
        "epoch_clips": rec.get("epoch_clips"),
        "views": rec.get("views"),
        "list_sha256": rec.get("list_sha256"),
        "run_dir": summary.get("run_dir", ""),
        "error": _first_line(result.error) if result.error else "",
    }


def read_summaries(trials_dir: Path, kind: str) -> dict:
    """{(method, amount, seed): summary} of the finished trials (the "protocol" record names its grid point)."""
    found = {}
    for path in sorted(trials_dir.glob("train-*/summary.json")):
        summary = json.loads(path.read_text())
        rec = summary.get("protocol")
        if rec:
            found[(rec["method"], rec[kind], rec["seed"])] = summary
    return found


def _first_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    key = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else repr(error))
    return f"{type(error).__name__}: {key.strip()}"[:300]


def aggregate(rows: list[dict], kind: str, metric: str) -> dict:
    """{amount: {method: {"mean", "std", "n"}}} over the ok trials; std is the sample std (n - 1), None for n = 1."""
    key = "val_top1" if metric == "final" else "best_val_top1"
    cells: dict = {}
    for r in rows:
        if r["status"] == "ok" and r[key] is not None:
            cells.setdefault(r[kind], {}).setdefault(r["method"], []).append(float(r[key]))
    return {
        amount: {
            m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
            for m, v in sorted(by_method.items())
        }
        for amount, by_method in sorted(cells.items())
    }


def table(agg: dict, kind: str, methods: list[str]) -> str:
    """The `K x method` markdown table, top-1 in percent, `mean ± std (n)`."""
    head = "K" if kind == "shots" else "p"
    lines = [f"| {head} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for amount, by_method in agg.items():
        cells = []
        for m in methods:
            c = by_method.get(m)
            if c is None:
                cells.append("")
            else:
                std = f"{100 * c['std']:.2f}" if c["std"] is not None else "–"
                cells.append(f"{100 * c['mean']:.2f} ± {std} (n={c['n']})")
        lines.append(f"| {amount} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, kind: str, metric: str, protocol: dict) -> None:
    """results.csv (per trial), protocol.json and results.md (the K x method table), fewshot.png; atomically."""
    from tune.sweep import markdown, write_csv

    keys = write_csv(rows, out / "results.csv")
    agg = aggregate(rows, kind, metric)
    methods = sorted({r["method"] for r in rows})
    md = table(agg, kind, methods)
    note = f"Validation top-1 (%), {metric} epoch, mean ± sample std over seeds; epochs: {protocol['epochs']}."
    atomic_write(out / "results.md", f"{md}\n\n{note}\n\n{markdown(rows, keys)}\n")
    cells = [{kind: a, "method": m, **c} for a, by_method in agg.items() for m, c in by_method.items()]
    atomic_write(out / "protocol.json", json.dumps({**protocol, "table": cells}, indent=1) + "\n")
    print(f"{md}\n{note}", flush=True)
    plot(agg, kind, methods, out / "fewshot.png")


def plot(agg: dict, kind: str, methods: list[str], path: Path) -> None:
    """Top-1 against K (or p) per method, error bars = sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        xs = [a for a in agg if m in agg[a]]
        ys = [100 * agg[a][m]["mean"] for a in xs]
        err = [100 * (agg[a][m]["std"] or 0.0) for a in xs]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
    if kind == "shots" and len(agg) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class (K)" if kind == "shots" else "fraction of training data (p)")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _lists(items: list[str]) -> dict[int, str]:
    lists = {}
    for item in items:
        k, sep, path = item.partition("=")
        if not sep or not k.isdigit():
            raise ConfigError(f"--lists: expected K=FILE, got {item!r}")
        lists[int(k)] = path
    return lists


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune.fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="experiment YAMLs, one per method (columns of the table)")
    p.add_argument("--source", required=True, help="`i2v data pack` output directory of the full training split")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--shots", type=int, nargs="+", help="K values (X-CLIP / ViFi-CLIP: 2 4 8 16)")
    how.add_argument("--percent", type=float, nargs="+", help="data fractions p (with --rule)")
    how.add_argument("--lists", nargs="+", metavar="K=FILE", help="fixed K-shot lists (ViFi-CLIP format) per K")
    p.add_argument("--rule", choices=PERCENT_RULES, default="random", help="--percent rule (i2v data subset --rule)")
    p.add_argument("--repeats", type=int, default=3, help="seeds 0 .. R-1 (ignored with --seeds)")
    p.add_argument("--seeds", type=int, nargs="+", help="explicit seeds")
    p.add_argument("--epochs", choices=["true", "repeat"], default="true", help="epoch semantics (module docstring)")
    p.add_argument("--metric", choices=["final", "best"], default="final", help="which epoch's top-1 is reported")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (GPUs // workers per trial)")
    p.add_argument("--out", default=None, help="output directory (default runs/fewshot-<first config>); reused: resume")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    out = args.out or f"runs/fewshot-{Path(args.configs[0]).stem}"
    try:
        run_protocol(
            args.configs,
            args.source,
            out,
            shots=args.shots or [],
            percent=args.percent or [],
            rule=args.rule,
            lists=_lists(args.lists) if args.lists else None,
            seeds=args.seeds if args.seeds is not None else list(range(args.repeats)),
            epochs=args.epochs,
            metric=args.metric,
            overrides=args.set,
            max_concurrent=args.max_concurrent,
            address=args.address,
        )
    except ConfigError as e:
        print(f"fewshot: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
