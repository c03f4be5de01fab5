"""Packs labelled videos into WebDataset tar shards (`i2v data pack`).

Output directory layout (what `i2v.data.wds` reads):

    OUT/shard-000000.tar ...   per sample KEY.<ext> (the original video bytes, or KEY.mp4 when re-encoded) or, for
                               a folder of frames, KEY.00000.jpg, KEY.00001.jpg, ... (the original image bytes, in
                               frame order), KEY.cls (class index, ASCII) and KEY.json (label, path, fps, frames,
                               duration, width, height, codec; a frame folder has fps 0 and codec jpeg or png)
    OUT/labels.json            class names; list position = class index
    OUT/index.json             {"pattern", "samples", "shards": {name: samples}, "classes": {name: samples}, "rejected"}
    OUT/rejects.csv            path,reason of every video that was not packed
    OUT/.parts/NAME.json       one record per finished shard: re-runs skip shards whose record matches the plan

Retrieval packs (`captions` given, `i2v.data.retrieval`) have no KEY.cls and no labels.json: KEY.json holds
{"video_id", "captions": [every caption, in annotation order], "path", fps, ...} and index.json has "task":
"retrieval" and "captions" (total caption count) instead of "classes".

Samples go to shards in list order, at most `shard_samples` samples and `shard_bytes` source bytes per shard, so the
plan is a pure function of the list and re-running after a crash rewrites only the unfinished shards. Every file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
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

from i2v.data.video import probe, probe_image, reencode
from i2v.files import atomic_write

_logger = logging.getLogger(__name__)

VIDEO_SUFFIXES: Final = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv")
IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png")  # frames of a video stored as a folder of images


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
    """Lists an ImageFolder-style tree: `videos_dir/<class name>/**/<video>`; the folder name is the label.

    A video is a video file, or a folder holding image frames (`*.jpg`, `*.jpeg`, `*.png`; extracted frames).
    """
    videos_dir = Path(videos_dir)
    classes = sorted(p for p in videos_dir.iterdir() if p.is_dir()) if videos_dir.is_dir() else []
    if not classes:
        raise ValueError(f"{videos_dir}: expected one sub-folder per class")
    return [
        (str(f), c.name)
        for c in classes
        for f in sorted(c.rglob("*"))
        if (f.suffix.lower() in VIDEO_SUFFIXES and f.is_file()) or (f.is_dir() and frame_files(f))
    ]


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder in frame order (numbers in names compare as numbers: img_2 < img_10)."""
    files = [f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    return sorted(files, key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)])


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


def ucf101_items(
    splits_dir: str | Path, root: str | Path, split: int, part: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """UCF101 official splits (`ucfTrainTestlist/`) -> ((path, label) items, class names in index order).

    `classInd.txt` lines are `<1-based id> <ClassName>` (class index = id - 1); `trainlist0N.txt` lines are
    `<ClassName>/<file> <id>` and `testlist0N.txt` lines `<ClassName>/<file>`: the label always comes from the
    directory part (the trailing id is ignored, as mmaction2's parser does). Videos are `root/<ClassName>/<file>`, or
    a frame folder `root/<ClassName>/<file stem>/` when the video file is absent.
    """
    splits_dir = Path(splits_dir)
    names = _numbered_names(splits_dir / "classInd.txt")
    known = set(names)
    _check_part(part)
    path = splits_dir / f"{'trainlist' if part == 'train' else 'testlist'}{split:02d}.txt"
    items = []
    for lineno, line in _lines(path):
        rel = line.split()[0]
        label = rel.split("/")[0]
        if "/" not in rel or label not in known:
            raise ValueError(
                f"{path}:{lineno}: expected '<ClassName>/<file>' with a class of classInd.txt, got {line!r}"
            )
        items.append((_video_or_frames(Path(root) / rel), label))
    return items, names


def hmdb51_items(
    splits_dir: str | Path, root: str | Path, split: int, part: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """HMDB51 official splits (`testTrainMulti_7030_splits/`) -> ((path, label) items, class names in index order).

    One file per class and split, `<class>_test_split<N>.txt`, lines `<video>.avi <flag>`: flag 1 = train, 2 = test,
    anything else (0) is not used in that split. Class indices follow the sorted class names (as mmaction2's
    `classInd.txt` for HMDB51 does). Videos are `root/<class>/<video>`, or a frame folder `root/<class>/<video stem>/`
    when the video file is absent.
    """
    _check_part(part)
    suffix = f"_test_split{split}.txt"
    files = {f.name[: -len(suffix)]: f for f in Path(splits_dir).glob(f"*{suffix}")}
    if not files:
        raise ValueError(f"{splits_dir}: no *{suffix} files (HMDB51's testTrainMulti_7030_splits)")
    names = sorted(files)
    want = "1" if part == "train" else "2"
    items = []
    for name in names:
        for lineno, line in _lines(files[name]):
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{files[name]}:{lineno}: expected '<video> <flag 0|1|2>', got {line!r}")
            if fields[1] == want:
                items.append((_video_or_frames(Path(root) / name / fields[0]), name))
    return items, names


def ssv1_items(
    csv_path: str | Path, labels_path: str | Path, root: str | Path
) -> tuple[list[tuple[str, str]], list[str]]:
    """Something-Something-v1 (JPEG frame folders) -> ((folder, label) items, class names in index order).

    `labels_path` is `something-something-v1-labels.csv`, one class name per line (class index = 0-based line
    order); `csv_path` is `something-something-v1-{train,validation}.csv`, lines `<id>;<label text>`; the frames of
    video `<id>` are `root/<id>/00001.jpg ...`. The test CSV has no labels and is refused.
    """
    names = [line for _, line in _lines(labels_path)]
    known = set(names)
    items = []
    for lineno, line in _lines(csv_path):
        vid, sep, label = line.partition(";")
        if not sep or not vid.strip() or label.strip() not in known:
            raise ValueError(f"{csv_path}:{lineno}: expected '<id>;<label of {Path(labels_path).name}>', got {line!r}")
        items.append((str(Path(root) / vid.strip()), label.strip()))
    return items, names


def rawframes_items(
    list_path: str | Path, root: str | Path, labels: list[str] | None = None
) -> tuple[list[tuple[str, str]], list[str]]:
    """A frame-folder list `<folder> <num_frames> <0-based label>` -> ((folder, label) items, class names).

    The format of Side4Video's `lists/sthv1/{train,val}_rgb.txt` and of mmaction2's rawframe annotation files.
    Folders are `root/<folder>`; the frame count is not read (the packer counts the images). Class names come from
    `labels` (index = label) or are the label numbers themselves.
    """
    items, rows = [], []
    for lineno, line in _lines(list_path):
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            raise ValueError(f"{list_path}:{lineno}: expected '<folder> <num_frames> <label>', got {line!r}")
        rows.append((lineno, fields[0], int(fields[2])))
    names = list(labels) if labels is not None else [str(i) for i in range(max((r[2] for r in rows), default=-1) + 1)]
    for lineno, folder, label in rows:
        if label >= len(names):
            raise ValueError(f"{list_path}:{lineno}: label {label} is past the {len(names)} class names")
        items.append((str(Path(root) / folder), names[label]))
    return items, names


def _lines(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of a text file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _numbered_names(path: Path) -> list[str]:
    """`<1-based id> <name>` lines (UCF101 classInd.txt) -> names in id order; ids must be 1..N."""
    ids = {}
    for lineno, line in _lines(path):
        num, _, name = line.partition(" ")
        if not num.isdigit() or not name.strip():
            raise ValueError(f"{path}:{lineno}: expected '<1-based id> <ClassName>', got {line!r}")
        ids[int(num)] = name.strip()
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise ValueError(f"{path}: class ids must be 1..{len(ids)}, got {sorted(ids)[:5]}...")
    return [ids[i] for i in range(1, len(ids) + 1)]


def _check_part(part: str) -> None:
    if part not in ("train", "test"):
        raise ValueError(f"split part: expected 'train' or 'test', got {part!r}")


def _video_or_frames(path: Path) -> str:
    """The video file, or the frame folder named after its stem when only extracted frames exist."""
    frames = path.with_suffix("")
    return str(frames if not path.exists() and frames.is_dir() else path)


def load_labels(path: str | Path) -> list[str]:
    """Reads class names: a JSON list, a JSON {name: index} mapping, an `id,name` CSV with that header (Side4Video's
    `lists/sth_labels.csv`, ViFi-CLIP's `labels/*_labels.csv`), or a text file with one name per line."""
    path = Path(path)
    first = path.read_text().partition("\n")[0].strip().lower().replace(" ", "")
    if path.suffix == ".csv" and first == "id,name":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
        try:
            ids = {int(r["id"]): r["name"].strip() for r in rows}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: expected 'id,name' rows with integer ids") from None
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"{path}: ids must be 0..{len(ids) - 1}")
        return [ids[i] for i in range(len(ids))]
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
    captions: list[list[str]] | None = None,
    shard_samples: int = 1000,
    shard_bytes: int = 1 << 30,
    workers: int = 0,
    reencode_to: dict | None = None,
    progress: bool = True,
) -> str:
    """Writes `items` as tar shards plus labels.json, index.json and rejects.csv in `out_dir`.

    Args:
        items: (video file or frame folder, label name) pairs; for a retrieval pack (video, video id) pairs.
        out_dir: Output directory (created).
        labels: Class names in index order; default: the sorted distinct labels of `items`.
        captions: Makes a retrieval pack: the captions of each item (parallel to `items`), stored in KEY.json; no
            class labels (KEY.cls, labels.json) are written.
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
    if reencode_to is not None and any(os.path.isdir(path) for path, _ in items):
        raise ValueError(f"{out_dir}: re-encoding applies to video files; the list holds frame folders")
    if captions is not None:
        if labels is not None:
            raise ValueError(f"{out_dir}: a retrieval pack (captions) has no class labels")
        if len(captions) != len(items) or not all(captions):
            raise ValueError(f"{out_dir}: need a non-empty caption list for each of the {len(items)} videos")
    out = Path(out_dir)
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    if captions is None:
        labels = list(labels) if labels is not None else sorted({label for _, label in items})
    class_index = {name: i for i, name in enumerate(labels or [])}
    plan = _plan(items, shard_samples, shard_bytes)
    records: dict[int, dict] = {}
    todo = []
    for i, chunk in enumerate(plan):
        samples = [
            (f"{j:07d}_{_slug(path)}", path, label, None if captions is None else list(captions[j]))
            for j, path, label in chunk
        ]
        signature = {"keys": [s[0] for s in samples], "reencode": reencode_to, "labels": labels}
        if captions is not None:  # a changed caption redoes the shard
            signature["captions"] = hashlib.sha256(json.dumps([s[3] for s in samples]).encode()).hexdigest()
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
    index = {
        "pattern": Path(pattern).name,
        "samples": sum(rec["samples"] for rec in records.values()),
        "shards": {name: records[i]["samples"] for i, name in enumerate(names)},
    }
    if captions is None:
        classes = Counter()
        for rec in records.values():
            classes.update({labels[int(k)]: v for k, v in rec["classes"].items()})
        index["classes"] = {name: classes[name] for name in labels}
    else:
        index.update(task="retrieval", captions=sum(rec["caption_count"] for rec in records.values()))
    index["rejected"] = len(rejects)
    rows = io.StringIO()
    csv.writer(rows).writerows([("path", "reason"), *rejects])
    atomic_write(out / "rejects.csv", rows.getvalue().encode())
    if captions is None:
        atomic_write(out / "labels.json", json.dumps(labels, indent=1).encode())
    atomic_write(out / "index.json", json.dumps(index, indent=1).encode())
    _logger.info("%s: %d samples in %d shards, %d rejected", out, index["samples"], len(plan), len(rejects))
    return pattern


def _plan(items: list[tuple[str, str]], max_samples: int, max_bytes: int) -> list[list[tuple[int, str, str]]]:
    """Splits the list into consecutive chunks by sample count and source size."""
    chunks, current, size = [], [], 0
    for j, (path, label) in enumerate(items):
        try:
            nbytes = sum(f.stat().st_size for f in frame_files(path)) if os.path.isdir(path) else os.path.getsize(path)
        except OSError:
            nbytes = 0
        if current and (len(current) >= max_samples or size + nbytes > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append((j, path, label))
        size += nbytes
    return [*chunks, current] if current else chunks


def _pack_shard(
    out_dir: str, i: int, samples: list[tuple[str, str, str, list | None]], class_index: dict, reencode_to, signature
) -> dict:
    """Writes one shard (temporary name, then rename) and its record; returns the record.

    A sample is (key, path, label, captions); with captions (retrieval) the label is the video id and no .cls is
    written.
    """
    out = Path(out_dir)
    final = out / _shard_name(i)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    rejects, classes, nbytes, count, ncaptions = [], Counter(), 0, 0, 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, path, label, captions in samples:
            try:
                if captions is None and label not in class_index:
                    raise ValueError(f"label {label!r} is not in the label map")
                if os.path.isdir(path):
                    members, info = _read_frames(path)
                else:
                    data = _read_bytes(path)
                    info = probe(data)
                    ext = Path(path).suffix.lower().lstrip(".") or "mp4"
                    if reencode_to is not None:
                        data, ext = reencode(data, **reencode_to), "mp4"
                        info = probe(data)
                    members = [(ext, data)]
            except Exception as e:  # a bad video is a reject, never a failed pack
                rejects.append((path, _reason(e)))
                continue
            for name, data in members:
                _add(tar, f"{key}.{name}", data)
            if captions is None:
                meta = {"label": label, "path": path, **info.to_dict()}
                _add(tar, f"{key}.cls", str(class_index[label]).encode())
                classes[class_index[label]] += 1
            else:
                meta = {"video_id": label, "captions": captions, "path": path, **info.to_dict()}
                ncaptions += len(captions)
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            count += 1
            nbytes += sum(len(d) for _, d in members)
    os.replace(tmp, final)
    record = {**signature, "samples": count, "bytes": nbytes, "rejects": rejects, "classes": classes}
    if "captions" in signature:  # retrieval
        record["caption_count"] = ncaptions
    atomic_write(out / ".parts" / f"{final.stem}.json", json.dumps(record).encode())
    return json.loads(json.dumps(record))  # same types as a record read back on resume


def _read_frames(folder: str) -> tuple[list[tuple[str, bytes]], object]:
    """A frame folder -> ([("00000.jpg", bytes), ...] in frame order, VideoInfo of the first frame)."""
    files = frame_files(folder)
    if not files:
        raise ValueError(f"no image frames ({'/'.join(IMAGE_SUFFIXES)}) in the folder")
    ext = {".jpeg": "jpg"}.get(files[0].suffix.lower(), files[0].suffix.lower().lstrip("."))
    if any(f.suffix.lower() != files[0].suffix.lower() for f in files):
        raise ValueError("mixed image formats in one frame folder")
    members = [(f"{i:05d}.{ext}", _read_bytes(str(f))) for i, f in enumerate(files)]
    return members, probe_image(members[0][1], len(members))


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
