"""`i2v data pack | subset | synth | stats`: build WebDataset shards (and subsets of them), check what training reads.

Heavy imports (torch, PyAV, webdataset) happen inside the command functions, so `i2v --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from i2v.config import ConfigError
from i2v.data.subset import PERCENT_RULES  # stdlib only

_logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `data` and its sub-commands on the `i2v` parser; each sets `func(args) -> exit code`."""
    parser = subparsers.add_parser("data", help="pack, generate and inspect WebDataset video shards")
    sub = parser.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser(
        "pack", help="pack videos into tar shards (+ labels.json, index.json, rejects.csv); also retrieval sets"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--list", type=Path, help="CSV/TSV of 'path,label' rows (paths relative to --root)")
    src.add_argument("--videos", type=Path, help="class-per-folder directory: VIDEOS/<label>/<video or frame folder>")
    src.add_argument("--kinetics-csv", type=Path, help="Kinetics annotation CSV (label,youtube_id,time_start,...)")
    src.add_argument("--ssv2-json", type=Path, help="something-something-v2-{train,validation}.json")
    src.add_argument("--ssv1-csv", type=Path, help="something-something-v1-{train,validation}.csv (id;label)")
    src.add_argument(
        "--rawframes", type=Path, help="'<folder> <num_frames> <label>' list (Side4Video sthv1, mmaction2)"
    )
    src.add_argument(
        "--ucf101", type=Path, metavar="SPLITS_DIR", help="UCF101 ucfTrainTestlist/ (with --split, --part)"
    )
    src.add_argument("--hmdb51", type=Path, metavar="SPLITS_DIR", help="HMDB51 *_test_splitN.txt dir (--split, --part)")
    src.add_argument(
        "--msrvtt", type=Path, metavar="CSV", help="retrieval: MSRVTT_train.9k.csv (+ --captions) or JSFUSION test csv"
    )
    src.add_argument(
        "--msvd", type=Path, metavar="LIST", help="retrieval: MSVD {train,val,test}_list.txt (+ --captions)"
    )
    src.add_argument(
        "--vatex", type=Path, metavar="LIST", help="retrieval: VATEX {train,val,test}_list.txt (+ --captions)"
    )
    p.add_argument(
        "--captions", type=Path, help="MSRVTT_data.json, MSVD raw-captions.pkl (or .json), VATEX vatex_data.json"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow reading a caption pickle (raw-captions.pkl)")
    p.add_argument("--ssv2-labels", type=Path, help="something-something-v2-labels.json (with --ssv2-json)")
    p.add_argument("--ssv1-labels", type=Path, help="something-something-v1-labels.csv (with --ssv1-csv)")
    p.add_argument("--split", type=int, default=1, help="UCF101 / HMDB51 official split number N (default 1)")
    p.add_argument("--part", choices=["train", "test"], help="UCF101 / HMDB51: which side of the split to pack")
    p.add_argument("--root", type=Path, help="directory the list's / annotation's videos are relative to")
    p.add_argument("--out", type=Path, required=True, help="shard directory to write")
    p.add_argument("--labels", type=Path, help="class order: labels.json of another split, a name list, an id,name CSV")
    p.add_argument("--shard-samples", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=float, default=1e9, help="max source bytes per shard")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    p.add_argument("--reencode", action="store_true", help="re-encode to H.264 (--short-side, --fps) for fast reads")
    p.add_argument("--short-side", type=int, default=320, help="re-encode: shorter side in pixels")
    p.add_argument("--fps", type=float, default=0, help="re-encode: frame rate (0: keep)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "subset", help="K-shot / data-percentage / fixed-list subset of a pack (no bytes copied; retrieval: --percent)"
    )
    p.add_argument("src", type=Path, help="`i2v data pack` output directory to draw from (e.g. split-N train)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--shots", type=int, help="exactly K clips of every class, without replacement")
    how.add_argument("--percent", type=float, help="data fraction p in (0, 1], by --rule")
    how.add_argument("--list", type=Path, help="import a fixed '<file name> <0-based label>' list (ViFi-CLIP format)")
    p.add_argument("--rule", choices=PERCENT_RULES, default="random", help="--percent rule (docs/data.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (recorded in index.json)")
    p.add_argument(
        "--out", type=Path, required=True, help="subset directory to write (index.json, labels.json, list.txt)"
    )
    p.set_defaults(func=cmd_subset)

    p = sub.add_parser(
        "synth",
        help="generate the synthetic temporal-order benchmark (mp4 + shards), or with --captions the retrieval one",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--captions", action="store_true", help="the captioned retrieval benchmark (OUT/train, OUT/test; docs/data.md)"
    )
    p.add_argument("--classes", nargs="+", help="class names (space or comma separated); default: all 8")
    p.add_argument("--train", type=int, help="training clips (default 400; --captions: 256)")
    p.add_argument("--val", type=int, help="validation clips (default 100)")
    p.add_argument("--test", type=int, help="--captions: test clips (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, help="frames per clip (default 16; --captions: 8)")
    p.add_argument("--size", type=int, help="height and width (default 64; --captions: 32)")
    p.add_argument("--workers", type=int, default=1, help="packing processes")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "stats",
        help="run the training pipeline once over shards; report clips, skips, labels (retrieval: videos, captions), "
        "speed",
    )
    p.add_argument("shards", help="`i2v data pack` output dir or a pattern, e.g. 'DIR/shard-{000000..000009}.tar'")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sampler", choices=["segment", "dense"], default="segment")
    p.add_argument("--stride", type=int, default=4, help="dense sampler stride")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument(
        "--max-words", type=int, default=32, help="retrieval: caption ids incl. SOT/EOT (retrieval.max_words)"
    )
    p.add_argument("--json", type=Path, help="also write the report here")
    p.set_defaults(func=cmd_stats)
    return parser


def cmd_pack(args: argparse.Namespace) -> int:
    import i2v.data.pack as packing

    labels = packing.load_labels(args.labels) if args.labels else None
    captions = None
    if args.msrvtt or args.msvd or args.vatex:
        items, captions = _retrieval_items(args)
    elif args.list:
        items = packing.read_list(args.list, args.root)
    elif args.videos:
        items = packing.scan_folders(args.videos)
    elif args.kinetics_csv:
        items = packing.kinetics_items(args.kinetics_csv, args.root or args.kinetics_csv.parent)
    elif args.ucf101 or args.hmdb51:
        if not args.part:
            raise ConfigError("--ucf101 / --hmdb51 need --part train or --part test")
        if not args.root:
            raise ConfigError("--ucf101 / --hmdb51 need --root (the folder of per-class video folders)")
        read = packing.ucf101_items if args.ucf101 else packing.hmdb51_items
        items, names = read(args.ucf101 or args.hmdb51, args.root, args.split, args.part)
        labels = labels or names
    elif args.rawframes:
        items, names = packing.rawframes_items(args.rawframes, args.root or args.rawframes.parent, labels)
        labels = labels or names
    elif args.ssv1_csv:
        if not args.ssv1_labels:
            raise ConfigError("--ssv1-csv needs --ssv1-labels")
        items, names = packing.ssv1_items(args.ssv1_csv, args.ssv1_labels, args.root or args.ssv1_csv.parent)
        labels = labels or names
    else:
        if not args.ssv2_labels:
            raise ConfigError("--ssv2-json needs --ssv2-labels (something-something-v2-labels.json)")
        items, names = packing.ssv2_items(args.ssv2_json, args.ssv2_labels, args.root or args.ssv2_json.parent)
        labels = labels or names
    reencode_to = {"short_side": args.short_side, "fps": args.fps} if args.reencode else None
    pattern = packing.pack(
        items,
        args.out,
        labels=labels,
        captions=captions,
        shard_samples=args.shard_samples,
        shard_bytes=int(args.shard_bytes),
        workers=args.workers,
        reencode_to=reencode_to,
        progress=not args.no_progress,
    )
    index = json.loads((args.out / "index.json").read_text())
    print(f"{index['samples']} samples in {len(index['shards'])} shards: {pattern}")
    if captions is not None:
        print(f"{index['captions']} captions")
    if index["rejected"]:
        print(f"{index['rejected']} videos rejected, see {args.out / 'rejects.csv'}")
    return 0 if index["samples"] else 1


def _retrieval_items(args: argparse.Namespace) -> tuple[list, list]:
    """(items, captions) of `--msrvtt` / `--msvd` / `--vatex` (i2v.data.retrieval)."""
    from i2v.data import retrieval

    if args.labels:
        raise ConfigError("--labels: retrieval packs (--msrvtt, --msvd, --vatex) have no class labels")
    if not args.root:
        raise ConfigError("--msrvtt / --msvd / --vatex need --root (the folder of <video id>.<ext> videos)")
    if args.msrvtt:
        return retrieval.msrvtt_items(args.msrvtt, args.root, args.captions)
    if not args.captions:
        raise ConfigError(f"--{'msvd' if args.msvd else 'vatex'} needs --captions (the caption file)")
    if args.msvd:
        return retrieval.msvd_items(args.msvd, args.captions, args.root, trust_pickle=args.trust_pickle)
    return retrieval.vatex_items(args.vatex, args.captions, args.root)


def cmd_subset(args: argparse.Namespace) -> int:
    from i2v.data.subset import make_subset

    record = make_subset(
        args.src, args.out, shots=args.shots, percent=args.percent, rule=args.rule, list_path=args.list, seed=args.seed
    )
    index = json.loads((args.out / "index.json").read_text())
    print(
        f"{index['samples']} of {record['source_samples']} clips ({record['rule']}, seed {record['seed']}): {args.out}"
    )
    if "captions" in index:
        print(f"{index['captions']} captions (retrieval)")
    print(f"list: {args.out / 'list.txt'}  sha256 {record['list_sha256']}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    if args.captions:
        from i2v.data.synth_captions import make_captioned

        if args.classes or args.val is not None:
            raise ConfigError("--captions: --classes and --val do not apply (the held-out split is --test)")
        shards = make_captioned(
            args.out,
            train=256 if args.train is None else args.train,
            test=48 if args.test is None else args.test,
            seed=args.seed,
            frames=args.frames or 8,
            size=args.size or 32,
            workers=args.workers,
            progress=True,
        )
        print(f"train: {shards.train}\ntest:  {shards.test}")
        return 0
    from i2v.data.synth import CLASSES, make_synthetic

    if args.test is not None:
        raise ConfigError("--test applies to --captions only (the classification benchmark has --val)")
    classes = [c for arg in args.classes for c in arg.split(",") if c] if args.classes else list(CLASSES)
    shards = make_synthetic(
        args.out,
        classes=classes,
        train=400 if args.train is None else args.train,
        val=100 if args.val is None else args.val,
        seed=args.seed,
        frames=args.frames or 16,
        size=args.size or 64,
        workers=args.workers,
        progress=True,
    )
    print(f"train: {shards.train}\nval:   {shards.val}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from i2v.data.wds import expand_shards

    try:
        expand_shards(args.shards)
    except (OSError, ValueError) as e:
        print(f"i2v data stats: {e}", file=sys.stderr)
        return 2
    report = run_stats(
        args.shards,
        frames=args.frames,
        size=args.size,
        sampler=args.sampler,
        stride=args.stride,
        batch_size=args.batch_size,
        workers=args.workers,
        max_words=args.max_words,
    )
    print(format_stats(report))
    if args.json:
        from i2v.files import atomic_write

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(report, indent=1))
    return 0


def run_stats(
    shards: str,
    *,
    frames: int = 8,
    size: int = 224,
    sampler: str = "segment",
    stride: int = 4,
    batch_size: int = 8,
    workers: int = 0,
    max_words: int = 32,
) -> dict:
    """One exactly-once pass of the training pipeline (augmentation included) over `shards`.

    Retrieval shards (index.json `"task": "retrieval"`) are read as `task: retrieval` trains on them: one sample per
    (video, caption) pair, and the report counts videos and captions instead of labels.

    Returns:
        {"clips", "skipped", "skipped_samples": [{"key", "reason"}], "skip_reasons", "labels": {name: count},
        "clips_per_s", "seconds", "video_shape"}; for retrieval shards "task": "retrieval", "clips" = pairs, and
        "videos", "captions", "captions_per_video", "caption_words" and "caption_tokens" ({"min", "mean", "max"};
        tokens: CLIP BPE without SOT/EOT), "truncated" (captions longer than `max_words` - 2 tokens), "max_words"
        instead of "labels".
    """
    from i2v.config import DataCfg
    from i2v.data.wds import _read_sibling, build_train_loader, read_label_map

    try:
        task = json.loads(_read_sibling(shards, "index.json")).get("task", "classification")
    except (OSError, ValueError):
        task = "classification"  # hand-made shards without an index: read as classification shards

    cfg = DataCfg(
        train_shards=shards,
        frames=frames,
        size=size,
        sampler=sampler,
        stride=stride,
        batch_size=batch_size,
        num_workers=workers,
        flip=False,
    )
    loader = build_train_loader(cfg, resampled=False, captions=task == "retrieval")  # raises if nothing matches
    if task == "retrieval":
        return _caption_stats(shards, loader, max_words)
    try:
        names = read_label_map(shards)
    except (OSError, ValueError) as e:
        _logger.warning("no label names: %s", e)
        names = []
    labels, clips, shape = Counter(), 0, None
    start = time.perf_counter()
    for video, label in loader:
        clips += len(label)
        labels.update(label.tolist())
        shape = list(video.shape[1:])
    seconds = time.perf_counter() - start
    return {
        "shards": shards,
        "clips": clips,
        "skipped": loader.skipped.count,
        "skipped_samples": [{"key": k, "reason": r} for k, r in loader.skipped.samples],
        "skip_reasons": dict(loader.skipped.reasons),
        "labels": {(names[i] if i < len(names) else str(i)): n for i, n in sorted(labels.items())},
        "clips_per_s": round(clips / seconds, 2) if seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "video_shape": shape,  # (T, C, H, W) per clip, uint8 as the loader workers ship it
    }


def _caption_stats(shards: str, loader, max_words: int) -> dict:
    """`run_stats` of retrieval shards: the pass over (video, caption) pairs, with video and caption counts."""
    import statistics

    from i2v.text import _tokenizer

    tokenizer = _tokenizer(max_words)
    per_video, words, tokens, clips, shape = Counter(), [], [], 0, None
    start = time.perf_counter()
    for video, metas in loader:
        clips += len(metas)
        shape = list(video.shape[1:])
        for m in metas:
            per_video[m["video_id"]] += 1
            words.append(len(m["caption"].split()))
            tokens.append(len(tokenizer.encode(m["caption"])))
    seconds = time.perf_counter() - start

    def spread(xs) -> dict:
        return {"min": min(xs), "mean": round(statistics.fmean(xs), 2), "max": max(xs)} if xs else None

    return {
        "shards": shards,
        "task": "retrieval",
        "clips": clips,
        "videos": len(per_video),
        "captions": clips,
        "captions_per_video": spread(list(per_video.values())),
        "caption_words": spread(words),
        "caption_tokens": spread(tokens),
        "max_words": max_words,
        "truncated": sum(n > max_words - 2 for n in tokens),
        "skipped": loader.skipped.count,
        "skipped_samples": [{"key": k, "reason": r} for k, r in loader.skipped.samples],
        "skip_reasons": dict(loader.skipped.reasons),
        "clips_per_s": round(clips / seconds, 2) if seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "video_shape": shape,
    }


def format_stats(report: dict) -> str:
    what = "pairs" if report.get("task") == "retrieval" else "clips"
    lines = [
        f"shards:   {report['shards']}",
        f"{what + ':':<9} {report['clips']}  ({report['clips_per_s']} clips/s over {report['seconds']} s)",
        f"skipped:  {report['skipped']}",
    ]
    lines += [f"  {s['key']}: {s['reason']}" for s in report["skipped_samples"][:50]]
    if report.get("task") == "retrieval":
        fmt = lambda d: f"min {d['min']}, mean {d['mean']}, max {d['max']}" if d else "-"  # noqa: E731
        lines += [
            f"videos:   {report['videos']}",
            f"captions: {report['captions']}  per video: {fmt(report['captions_per_video'])}",
            f"caption words:  {fmt(report['caption_words'])}",
            f"caption tokens: {fmt(report['caption_tokens'])}  (CLIP BPE; {report['truncated']} longer than the "
            f"{report['max_words'] - 2} that max_words {report['max_words']} keeps)",
        ]
        return "\n".join(lines)
    lines.append("labels:")
    lines += [f"  {name}: {n}" for name, n in report["labels"].items()]
    return "\n".join(lines)
