"""Packs labelled videos into WebDataset tar shards (`i2v data pack`).

Output directory layout (what `i2v.data.wds` reads):

    OUT/shard-000000.tar ...   per sample KEY.<ext> (the original video bytes, or KEY.mp4 when re-encoded),
                               KEY.cls (class index, ASCII) and KEY.json (label, path, fps, frames, duration, width,
                               height, codec)
    OUT/labels.json            class names; list position = class index
    OUT/index.json             {"pattern", "samples", "shards": {name: samples}, "classes": {name: samples}, "rejected"}
    OUT/rejects.csv            path,reason of every video that was not packed
    OUT/.parts/NAME.json       one record per finished shard: re-runs skip shards whose record matches the plan

Samples go to shards in list order, at most `shard_samples` samples and `shard_bytes` source bytes per shard, so the
plan is a pure function of the list and re-running after a crash rewrites only the unfinished shards. Every file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Final

from tqdm import tqdm

from i2v.data.video import probe, reencode
from i2v.files import atomic_write

_logger = logging.getLogger(__name__)

VIDEO_SUFFIXES: Final = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: (path, label name) lists


def read_list(path: str | Path, root: str | Path | None = None) -> list[tuple[str, str]]:
    """Reads a `path,label` CSV (or TSV) list; relative paths are taken from `root`.

    An optional header row `path,label` is skipped; blank lines are ignored.

    Raises:
        ValueError: Naming the file and line of a malformed row.
    """
    path = Path(path)
    text = path.read_text()
    delimiter = "\t" if path.suffix == ".tsv" or "\t" in text.partition("\n")[0] else ","
    items = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        if not row or not "".join(row).strip():
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{path}:{lineno}: expected 'path{delimiter}label', got {row!r}")
        items.append((_join(root, row[0].strip()), row[1].strip()))
    return items


def scan_folders(videos_dir: str | Path) -> list[tuple[str, str]]:
    """Lists an ImageFolder-style tree: `videos_dir/<class name>/**/<video>`; the folder name is the label."""
    videos_dir = Path(videos_dir)
    classes = sorted(p for p in videos_dir.iterdir() if p.is_dir()) if videos_dir.is_dir() else []
    if not classes:
        raise ValueError(f"{videos_dir}: expected one sub-folder per class")
    return [
        (str(f), c.name)
        for c in classes
        for f in sorted(c.rglob("*"))
        if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file()
    ]


def kinetics_items(csv_path: str | Path, root: str | Path) -> list[tuple[str, str]]:
    """Kinetics-400/600/700 annotations (`label,youtube_id,time_start,time_end,split`) -> (path, label).

    Videos are found by their usual name `{youtube_id}_{start:06d}_{end:06d}.<ext>` anywhere under `root` (per-class
    folders, with or without spaces in folder names, or flat). Rows whose video is absent keep the per-class path
    and are rejected as missing by the packer.
    """
    csv_path, root = Path(csv_path), Path(root)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a header with columns {sorted(need)}")
    found = {p.stem: str(p) for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES}
    items = []
    for lineno, row in enumerate(rows, start=2):
        try:
            name = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            raise ValueError(f"{csv_path}:{lineno}: bad time_start/time_end in {row}") from None
        items.append((found.get(name, str(root / row["label"] / f"{name}.mp4")), row["label"]))
    return items


def ssv2_items(
    json_path: str | Path, labels_path: str | Path, root: str | Path
) -> tuple[list[tuple[str, str]], list[str]]:
    """Something-Something-v2 annotations -> ((path, label) items, class names in index order).

    `json_path` is `something-something-v2-{train,validation}.json` (a list of {"id", "label", "template",
    "placeholders"}), `labels_path` is `something-something-v2-labels.json` ({template: "index"}); videos are
    `root/{id}.webm`. The class of an entry is its template with the brackets removed.
    """
    entries = json.loads(Path(json_path).read_text())
    mapping = json.loads(Path(labels_path).read_text())
    if not isinstance(mapping, dict):
        raise ValueError(f"{labels_path}: expected a {{template: index}} mapping")
    names = [name for name, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
    items = []
    for e in entries:
        template = str(e.get("template", "")).replace("[", "").replace("]", "")
        if template not in mapping:
            raise ValueError(f"{json_path}: id {e.get('id')}: template {template!r} is not in {labels_path}")
        items.append((str(Path(root) / f"{e['id']}.webm"), template))
    return items, names


def load_labels(path: str | Path) -> list[str]:
    """Reads class names: a JSON list, a JSON {name: index} mapping, or a text file with one name per line."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
        if isinstance(data, list):
            return [str(x) for x in data]
        raise ValueError(f"{path}: expected a list of names or a {{name: index}} mapping")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _join(root: str | Path | None, p: str) -> str:
    return str(Path(root) / p) if root is not None and not os.path.isabs(p) else p


# ----------------------------------------------------------------------------------------------------------------------
# Packing


def pack(
    items: list[tuple[str, str]],
    out_dir: str | Path,
    *,
    labels: list[str] | None = None,
    shard_samples: int = 1000,
    shard_bytes: int = 1 << 30,
    workers: int = 0,
    reencode_to: dict | None = None,
    progress: bool = True,
) -> str:
    """Writes `items` as tar shards plus labels.json, index.json and rejects.csv in `out_dir`.

    Args:
        items: (video path, label name) pairs.
        out_dir: Output directory (created).
        labels: Class names in index order; default: the sorted distinct labels of `items`.
        shard_samples: Maximum samples per shard.
        shard_bytes: Maximum source bytes per shard (a single larger video gets a shard of its own).
        workers: Processes; 0 = one per CPU, 1 = in this process.
        reencode_to: None keeps the original bytes; else keyword arguments of `i2v.data.video.reencode`
            (short_side, fps, crf, gop).
        progress: Show a progress bar.

    Returns:
        The brace pattern of the shards, e.g. "OUT/shard-{000000..000003}.tar".
    """
    if not items:
        raise ValueError(f"{out_dir}: no videos to pack")
    out = Path(out_dir)
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    labels = list(labels) if labels is not None else sorted({label for _, label in items})
    class_index = {name: i for i, name in enumerate(labels)}
    plan = _plan(items, shard_samples, shard_bytes)
    records: dict[int, dict] = {}
    todo = []
    for i, chunk in enumerate(plan):
        samples = [(f"{j:07d}_{_slug(path)}", path, label) for j, path, label in chunk]
        signature = {"keys": [k for k, _, _ in samples], "reencode": reencode_to, "labels": labels}
        record = _read_record(out, i, signature)
        if record is not None:
            records[i] = record
        else:
            todo.append((str(out), i, samples, class_index, reencode_to, signature))
    if len(plan) - len(todo):
        _logger.info("%s: %d of %d shards already complete", out, len(plan) - len(todo), len(plan))
    bar = tqdm(total=sum(len(t[2]) for t in todo), unit="video", desc="pack", disable=not progress)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) <= 1:
        for task in todo:
            records[task[1]] = _pack_shard(*task)
            bar.update(len(task[2]))
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_pack_shard, *task): task for task in todo}
            for fut in cf.as_completed(futures):
                task = futures[fut]
                records[task[1]] = fut.result()
                bar.update(len(task[2]))
    bar.close()

    names = [_shard_name(i) for i in range(len(plan))]
    pattern = str(out / (f"shard-{{000000..{len(plan) - 1:06d}}}.tar" if len(plan) > 1 else "shard-000000.tar"))
    rejects = [r for i in range(len(plan)) for r in records[i]["rejects"]]
    classes = Counter()
    for rec in records.values():
        classes.update({labels[int(k)]: v for k, v in rec["classes"].items()})
    index = {
        "pattern": Path(pattern).name,
        "samples": sum(rec["samples"] for rec in records.values()),
        "shards": {name: records[i]["samples"] for i, name in enumerate(names)},
        "classes": {name: classes[name] for name in labels},
        "rejected": len(rejects),
    }
    rows = io.StringIO()
    csv.writer(rows).writerows([("path", "reason"), *rejects])
    atomic_write(out / "rejects.csv", rows.getvalue().encode())
    atomic_write(out / "labels.json", json.dumps(labels, indent=1).encode())
    atomic_write(out / "index.json", json.dumps(index, indent=1).encode())
    _logger.info("%s: %d samples in %d shards, %d rejected", out, index["samples"], len(plan), len(rejects))
    return pattern


def _plan(items: list[tuple[str, str]], max_samples: int, max_bytes: int) -> list[list[tuple[int, str, str]]]:
    """Splits the list into consecutive chunks by sample count and source size."""
    chunks, current, size = [], [], 0
    for j, (path, label) in enumerate(items):
        try:
            nbytes = os.path.getsize(path)
        except OSError:
            nbytes = 0
        if current and (len(current) >= max_samples or size + nbytes > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append((j, path, label))
        size += nbytes
    return [*chunks, current] if current else chunks


def _pack_shard(
    out_dir: str, i: int, samples: list[tuple[str, str, str]], class_index: dict, reencode_to: dict | None, signature
) -> dict:
    """Writes one shard (temporary name, then rename) and its record; returns the record."""
    out = Path(out_dir)
    final = out / _shard_name(i)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    rejects, classes, nbytes = [], Counter(), 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, path, label in samples:
            try:
                if label not in class_index:
                    raise ValueError(f"label {label!r} is not in the label map")
                data = _read_bytes(path)
                info = probe(data)
                ext = Path(path).suffix.lower().lstrip(".") or "mp4"
                if reencode_to is not None:
                    data, ext = reencode(data, **reencode_to), "mp4"
                    info = probe(data)
            except Exception as e:  # a bad video is a reject, never a failed pack
                rejects.append((path, _reason(e)))
                continue
            meta = {"label": label, "path": path, **info.to_dict()}
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.cls", str(class_index[label]).encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            classes[class_index[label]] += 1
            nbytes += len(data)
    os.replace(tmp, final)
    record = {**signature, "samples": sum(classes.values()), "bytes": nbytes, "rejects": rejects, "classes": classes}
    atomic_write(out / ".parts" / f"{final.stem}.json", json.dumps(record).encode())
    return json.loads(json.dumps(record))  # same types as a record read back on resume


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise ValueError("missing file")
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file")
    return data


def _read_record(out: Path, i: int, signature: dict) -> dict | None:
    """The record of shard i if that shard is complete and was packed with the same plan, else None."""
    path = out / ".parts" / f"shard-{i:06d}.json"
    if not (out / _shard_name(i)).exists() or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if all(record.get(k) == v for k, v in signature.items()) else None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _slug(path: str) -> str:
    """A WebDataset-safe key part (no dots: the key ends at the first dot of a member name)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", Path(path).stem)[-60:]


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"
