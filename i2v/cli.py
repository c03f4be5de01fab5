"""The `i2v` command line.

i2v describe --method side4video --backbone ViT-B-16 --frames 8 --num-classes 400 [--set key=value ...]
i2v list-methods
i2v data pack|synth|stats ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from i2v.config import load_config
from i2v.files import atomic_write


def _describe(args: argparse.Namespace) -> int:
    from i2v.describe import describe, format_table
    from i2v.methods import list_methods

    names = list_methods() if args.method == "all" else args.method.split(",")
    rows = []
    for name in names:
        overrides = [
            f"method.name={name}",
            f"backbone.name={args.backbone}",
            f"data.frames={args.frames}",
            f"data.num_classes={args.num_classes}",
        ]
        rows.append(describe(load_config(args.config, args.set, defaults=overrides)))  # --set may replace a flag
    print(format_table(rows))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    from i2v.train.driver import format_summary, run_training

    cfg = load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    summary = run_training(cfg, out, address=args.address, progress=not args.no_progress, verbose=args.verbose)
    print(format_summary(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from i2v.eval import run_eval

    if args.config and "=" in args.config:  # no config file given, only overrides
        args.config, args.overrides = None, [args.config, *args.overrides]
    m = run_eval(args.checkpoint, args.config, args.overrides, args.out)
    if m.get("task") == "retrieval":
        for d, name in (("t2v", "text-to-video"), ("v2t", "video-to-text")):
            r1, r5, r10, mdr, mnr = (m[f"{d}_{k}"] for k in ("r1", "r5", "r10", "mdr", "mnr"))
            print(f"{name}: R@1 {r1:.1f}  R@5 {r5:.1f}  R@10 {r10:.1f}  MdR {mdr:.1f}  MnR {mnr:.1f}")
        print(f"{m['num_videos']} videos, {m['num_captions']} captions, chance R@1 {m['chance_r1']:.2f}")
        print(f"wrote {m['out']}/summary.json")
        return 0
    print(f"top-1 {m['val_top1']:.4f}  top-5 {m['val_top5']:.4f}  clips {m['val_clips']}  views {m['views']}")
    for label, acc in zip(m["labels"], m["val_per_class"]):
        print(f"  {acc:.4f}  {label}")
    print(f"wrote {m['out']}/metrics.json and confusion.png")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from i2v.eval import predict

    failed = 0
    for r in predict(args.checkpoint, args.videos, topk=args.topk, overrides=args.set):
        if "error" in r:
            print(f"{r['video']}: {r['error']}", file=sys.stderr)
            failed += 1
            continue
        print(r["video"])
        for label, p in r["top"]:
            print(f"  {p:.4f}  {label}")
    return 1 if failed else 0


def _search(args: argparse.Namespace) -> int:
    from i2v.tasks.retrieval import search

    r = search(args.checkpoint, args.videos, args.queries, topk=args.topk, overrides=args.set)
    for q in r["results"]:
        print(q["query"])
        for vid, score, caption in q["top"]:
            print(f"  {score:.4f}  {vid}  ({caption})")
    print(f"{r['videos']} clips, features {'read from' if r['cached'] else 'cached in'} {r['cache']}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from i2v.export import export

    r = export(args.checkpoint, args.out, overrides=args.set)
    print(f"wrote {r['out']}: {r['tensors']} tensors, {r['params']:,} parameters")
    return 0


def _tune(args: argparse.Namespace) -> int:
    """`i2v tune ...` is `python -m tune.sweep ...` (the i2v library never imports the top-level tune package)."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "tune.sweep", *args.args])


def _list_methods(args: argparse.Namespace) -> int:
    from i2v.methods import METHODS, list_methods

    for name in list_methods():
        doc = (sys.modules[METHODS[name].__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="i2v", description="Frozen image backbones -> video recognisers.")
    parser.add_argument(
        "--verbose", action="store_true", help="all library logs and warnings; tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="trainable/frozen parameters and inference GFLOPs of a method (no weights)")
    p.add_argument("--method", required=True, help="a registered method, a comma list, or 'all'")
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip model name or model-config .json")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--config", default=None, help="experiment YAML to start from (default: built-in defaults)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. method.bottleneck=128"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.set_defaults(func=_describe)

    p = sub.add_parser("train", help="train on Ray Train (local cluster, or RAY_ADDRESS / --address)")
    p.add_argument("config", help="experiment YAML, e.g. configs/smoke.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. method.name=st_adapter")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>); an existing one resumes")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="= i2v --verbose train ...")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="multi-view testing of a checkpoint: top-1/top-5/per-class, JSON + confusion PNG")
    p.add_argument("config", nargs="?", default=None, help="experiment YAML for data/views (default: the run's)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.test_clips=4 data.test_crops=3")
    p.add_argument("--checkpoint", required=True, help="a run's final.pt or a checkpoint directory")
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint dir>/eval)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="top-k labels of video files")
    p.add_argument("videos", nargs="+")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. data.test_clips=3")
    p.set_defaults(func=_predict)

    p = sub.add_parser("search", help="top-k clips of retrieval shards for text queries (a retrieval checkpoint)")
    p.add_argument("queries", nargs="+", help='e.g. "a red square moving left"')
    p.add_argument("--checkpoint", required=True, help="a retrieval run's final.pt or a checkpoint directory")
    p.add_argument("--videos", required=True, help="retrieval shards (pattern or pack directory) to search")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. retrieval.eval_block=64")
    p.set_defaults(func=_search)

    p = sub.add_parser("export", help="the inference model (ZeroI2V merged) as safetensors with open_clip keys")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_export)

    p = sub.add_parser("tune", help="Ray Tune sweep (= python -m tune.sweep; see its --help)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_tune)

    p = sub.add_parser("list-methods", help="list the registered methods")
    p.set_defaults(func=_list_methods)

    from i2v.bench import add_parser as add_bench_parser
    from i2v.data.cli import add_parser as add_data_parser
    from i2v.plan import add_parser as add_plan_parser

    add_data_parser(sub)
    add_bench_parser(sub)
    add_plan_parser(sub)

    args, extra = parser.parse_known_args(argv)
    if args.command == "tune":  # everything after `tune` belongs to tune.sweep
        args.args = [*extra, *args.args]
    elif hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE after an option: `i2v train CFG --out DIR k=v`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from i2v.console import configure

    configure(args.verbose)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # Bad user input (ConfigError is a ValueError): one line, argparse's style and exit code. --verbose re-raises,
        # so a genuine bug that happens to raise one of these still shows its traceback there.
        if args.verbose:
            raise
        print(f"i2v: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
