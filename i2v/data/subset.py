"""`i2v data subset`: K-shot, data-percentage and fixed-list subsets of a pack, as an index over its shards.

    i2v data subset data/ucf101/train1 --shots 4 --seed 0 --out data/ucf101/train1-4shot-s0
    i2v data subset data/k400/train --percent 0.1 --rule first --out data/k400/train-10pc
    i2v data subset data/ucf101/train1 --list train1_few_shot_4.txt --out data/ucf101/vifi-4shot

A subset copies no video bytes. DST holds
    DST/index.json    like a pack's ("samples", "shards", "classes", "rejected"): "shards" names the SRC shards that
                      hold a chosen clip (paths relative to DST) with the number chosen in each; "subset" records the
                      rule, its parameters, the seed, the source, the list's SHA-256 and the chosen sample keys
    DST/labels.json   SRC's class names (class indices are unchanged, also for class-subset rules)
    DST/list.txt      the chosen clips as `<file name> <0-based label>` lines (ViFi-CLIP's list format), SRC order;
                      an imported list is copied byte for byte, so its hash is the hash of the published file
Everything that takes shards (training configs, `i2v data stats`, `expand_shards`) accepts DST: readers stream the
named SRC shards and keep only the chosen keys (`i2v.data.wds.subset_keys`), and the shard index counts only those,
so an epoch of a K-shot subset is K x C clips unless `data.epoch_clips` says otherwise.

Rules (shared/RETRIEVAL_FEWSHOT.md §2.1b-2.2):
- shots K: exactly K clips of every class, drawn without replacement with `random.Random(seed)` (class by class in
  index order); a class with fewer than K clips is an error.
- percent p, with --rule
    random      Side4Video's commented-out `_parse_list` block: shuffle the whole list (seeded), keep the first
                int(N p);
    first       Side4Video's `lists/k400/train_dataper/*_{p}.txt`: the first floor(N p) // C clips of each class in
                SRC order;
    per_class   the same per-class count, drawn at random (seeded) instead of the first ones;
    class_count Side4Video's `*_{p}_class.txt`: every clip of the int(p C) classes with the most clips (ties: lower
                class index first; the reference's tie-break is not known);
    class_ids   Side4Video's `*_{p}_class_sort.txt`: every clip of class indices 0 .. int(p C) - 1.
  For `first` / `per_class`, what the reference does with a class shorter than its quota is not known: i2v keeps
  all of that class's clips and records the class under "short_classes".
- list FILE: `<file name> <0-based label>` lines (ViFi-CLIP's `train1_few_shot_K.txt`), matched to SRC clips by the
  file name of the packed path; an unknown name, a name that matches several clips or a label other than the
  clip's class is an error.

Retrieval packs (index.json `"task": "retrieval"`: `--msrvtt/--msvd/--vatex`, `synth --captions`) have videos and
captions, no classes: only `--percent p --rule random` applies (int(N p) videos, every caption of each kept); the
other rules are an error. DST/index.json then holds `"task": "retrieval"` and `"captions"` (the kept videos'
captions, so steps per epoch need no scan), DST/list.txt the kept video ids, one per line, and no labels.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from i2v.files import atomic_write

_logger = logging.getLogger(__name__)

PERCENT_RULES: Final = ("random", "first", "per_class", "class_count", "class_ids")
EPS: Final = 1e-9  # int(p * n) for p = 0.29, n = 100 is 28 in floating point: round up across the error


@dataclass(frozen=True)
class Clip:
    """One packed sample, read from the shard headers and its small members (no video bytes are read)."""

    key: str
    label: int  # -1 in a retrieval pack
    name: str  # file name of the packed path (a frame folder's name for frame sequences); a retrieval pack: video id
    shard: str  # shard file name inside SRC
    captions: int = 0  # a retrieval pack: the sample's captions


def read_clips(src: str | Path) -> tuple[list[Clip], list[str], dict]:
    """The clips of a pack output directory in index order, its class names and its index.

    Tar headers are read with seeks past the member data, so only the `cls` and `json` members are read.

    Raises:
        ValueError: When SRC is not a pack output directory (or is itself a subset) or a sample lacks cls/json.
    """
    src = Path(src)
    try:
        index = json.loads((src / "index.json").read_text())
        retrieval = index.get("task") == "retrieval"
        labels = [] if retrieval else json.loads((src / "labels.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}: not an `i2v data pack` output directory (index.json, labels.json): {e}") from None
    if "subset" in index:
        raise ValueError(f"{src}: is itself a subset; give the pack output directory it was drawn from")
    want = {"json"} if retrieval else {"cls", "json"}
    clips = []
    for shard in index["shards"]:
        found: dict[str, dict] = defaultdict(dict)
        with tarfile.open(src / shard, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext in want:
                    found[key][ext] = tar.extractfile(member).read()
        for key, parts in found.items():
            if set(parts) != want:
                raise ValueError(f"{src / shard}: sample {key} lacks its {' or '.join(sorted(want))} member")
            if retrieval:
                from i2v.data.wds import caption_meta

                try:
                    meta = caption_meta(parts)
                except ValueError as e:
                    raise ValueError(f"{src / shard}: sample {key}: {e}") from None
                clips.append(Clip(key, -1, meta["video_id"], shard, len(meta["captions"])))
                continue
            path = json.loads(parts["json"]).get("path", key)
            clips.append(Clip(key, int(parts["cls"]), Path(path).name, shard))
    return clips, labels, index


def by_class(clips: list[Clip], num_classes: int) -> list[list[Clip]]:
    groups: list[list[Clip]] = [[] for _ in range(num_classes)]
    for clip in clips:
        groups[clip.label].append(clip)
    return groups


def draw_shots(clips: list[Clip], labels: list[str], shots: int, seed: int) -> list[Clip]:
    """Exactly `shots` clips of every class, without replacement; a short class is an error."""
    if shots < 1:
        raise ValueError(f"--shots: {shots} must be >= 1")
    rng = random.Random(seed)
    chosen = []
    for c, group in enumerate(by_class(clips, len(labels))):
        if len(group) < shots:
            raise ValueError(f"class {c} {labels[c]!r} has {len(group)} clips, fewer than --shots {shots}")
        chosen += rng.sample(group, shots)
    return chosen


def draw_percent(clips: list[Clip], labels: list[str], p: float, rule: str, seed: int) -> tuple[list[Clip], list]:
    """A data-percentage subset by one of PERCENT_RULES; returns (clips, short classes [(index, clips, quota)])."""
    if not 0 < p <= 1:
        raise ValueError(f"--percent: {p} must be in (0, 1]")
    if rule not in PERCENT_RULES:
        raise ValueError(f"--rule: {rule!r} is not one of {', '.join(PERCENT_RULES)}")
    rng, short = random.Random(seed), []
    if rule == "random":  # the one rule without classes (retrieval packs)
        order = list(clips)
        rng.shuffle(order)
        return order[: int(len(clips) * p + EPS)], short
    groups, n_classes = by_class(clips, len(labels)), int(p * len(labels) + EPS)
    if rule in ("first", "per_class"):
        quota = int(len(clips) * p + EPS) // len(labels)
        chosen = []
        for c, group in enumerate(groups):
            if len(group) < quota:
                short.append((c, len(group), quota))
            chosen += group[:quota] if rule == "first" else rng.sample(group, min(quota, len(group)))
        return chosen, short
    if n_classes < 1:
        raise ValueError(f"--percent {p} of {len(labels)} classes keeps no class")
    if rule == "class_count":
        keep = sorted(range(len(labels)), key=lambda c: (-len(groups[c]), c))[:n_classes]
    else:
        keep = range(n_classes)
    return [clip for c in sorted(keep) for clip in groups[c]], short


def match_list(clips: list[Clip], labels: list[str], path: Path) -> list[Clip]:
    """The clips named by a `<file name> <0-based label>` list (ViFi-CLIP format), in list order."""
    named: dict[str, list[Clip]] = defaultdict(list)
    for clip in clips:
        named[clip.name].append(clip)
    chosen, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{lineno}: expected '<file name> <0-based label>', got {line!r}")
        name, label = Path(fields[0]).name, int(fields[1])
        hits = named.get(name, [])
        if len(hits) != 1:
            why = "is not in the source pack" if not hits else f"matches {len(hits)} packed clips"
            raise ValueError(f"{path}:{lineno}: {name} {why}")
        clip = hits[0]
        if clip.label != label:
            packed = labels[clip.label]
            raise ValueError(
                f"{path}:{lineno}: {name} has label {label} in the list but class {clip.label} ({packed!r}) in the "
                "pack; pack with --labels in the list's class order"
            )
        if clip.key in seen:
            raise ValueError(f"{path}:{lineno}: {name} is listed twice")
        seen.add(clip.key)
        chosen.append(clip)
    if not chosen:
        raise ValueError(f"{path}: the list names no clip")
    return chosen


def make_subset(
    src: str | Path,
    out: str | Path,
    *,
    shots: int | None = None,
    percent: float | None = None,
    rule: str = "random",
    list_path: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Writes the subset directory `out` over the pack `src` by exactly one of shots / percent / list_path.

    Returns:
        The "subset" record written into `out/index.json` (without the key list).

    Raises:
        ValueError: For a bad source, list or parameter, or an `out` that is a pack (it would be overwritten).
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if sum(x is not None for x in (shots, percent, list_path)) != 1:
        raise ValueError("give exactly one of --shots, --percent, --list")
    if out == src:
        raise ValueError(f"{out}: the subset directory must differ from the source pack")
    if (out / "index.json").is_file() and "subset" not in json.loads((out / "index.json").read_text()):
        raise ValueError(f"{out}: holds a pack, not a subset; choose another --out")
    clips, labels, src_index = read_clips(src)
    retrieval = src_index.get("task") == "retrieval"
    if retrieval and (percent is None or rule != "random"):
        given = "--shots" if shots is not None else "--list" if list_path is not None else f"--rule {rule}"
        raise ValueError(
            f'{src}: a retrieval pack (index.json "task": "retrieval") has no classes, so {given} does not apply; '
            "use --percent P (--rule random)"
        )
    record: dict = {"source": os.path.relpath(src, out), "seed": seed}
    short: list = []
    if shots is not None:
        chosen = draw_shots(clips, labels, shots, seed)
        record |= {"rule": "shots", "shots": shots}
        list_bytes = None
    elif percent is not None:
        chosen, short = draw_percent(clips, labels, percent, rule, seed)
        record |= {"rule": f"percent/{rule}", "percent": percent}
        list_bytes = None
    else:
        list_path = Path(list_path)
        chosen = match_list(clips, labels, list_path)
        list_bytes = list_path.read_bytes()
        record |= {"rule": "list", "imported": str(list_path.resolve()), "seed": None}
    if not chosen:
        raise ValueError(f"{src}: the subset is empty")
    keep = {c.key for c in chosen}
    chosen = [c for c in clips if c.key in keep]  # SRC order: shards are read in order, so are the clips
    if list_bytes is None:
        list_bytes = "".join(f"{c.name}\n" if retrieval else f"{c.name} {c.label}\n" for c in chosen).encode()
    shards: dict[str, int] = {}
    for c in chosen:
        rel = os.path.relpath(src / c.shard, out)
        shards[rel] = shards.get(rel, 0) + 1
    counts = [0] * len(labels)
    for c in chosen if not retrieval else ():
        counts[c.label] += 1
    record |= {
        "list": "list.txt",
        "list_sha256": hashlib.sha256(list_bytes).hexdigest(),
        "source_samples": len(clips),
        "short_classes": [{"class": labels[c], "clips": n, "quota": q} for c, n, q in short],
    }
    index = {"samples": len(chosen), "shards": shards}
    if retrieval:
        index |= {"task": "retrieval", "captions": sum(c.captions for c in chosen)}
    else:
        index["classes"] = dict(zip(labels, counts, strict=True))
    index |= {"rejected": 0, "subset": record | {"keys": [c.key for c in chosen]}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "list.txt", list_bytes)
    if not retrieval:
        atomic_write(out / "labels.json", json.dumps(labels, indent=1).encode())
    atomic_write(out / "index.json", json.dumps(index, indent=1).encode())  # last: a complete subset has an index
    for c, n, q in short:
        _logger.warning("%s: class %r has %d clips, fewer than the per-class quota %d: all kept", out, labels[c], n, q)
    _logger.info("%s: %d of %d clips of %s (%s)", out, len(chosen), len(clips), src, record["rule"])
    return record
