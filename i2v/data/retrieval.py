"""Text-video retrieval data: MSR-VTT, MSVD and VATEX annotation readers, and the caption side of retrieval shards.

A retrieval pack is a classification pack (`i2v.data.pack.pack`) without class labels:

    OUT/shard-000000.tar ...   per sample KEY.<video ext> (or the frame sequence KEY.00000.jpg ...) and KEY.json
                               {"video_id": str, "captions": [str, ...], "path", "fps", "frames", ...}; no KEY.cls
    OUT/index.json             {"pattern", "samples", "shards", "task": "retrieval", "captions": total, "rejected"}
    OUT/rejects.csv            path,reason of every listed video whose media is missing or unreadable

`captions` holds every caption of the video as text, in annotation-file order (tokenisation happens at read time).
Samples keep the order of the official list (the key starts with the 0-based list position), so sample i of the
concatenated shards is the i-th packed video of the list: the i-th video of the official test list when
`rejects.csv` is empty. Which captions go where follows shared/RETRIEVAL_FEWSHOT.md section 1.7: MSR-VTT train
videos carry all their MSRVTT_data.json sentences, each 1k-A (JSFusion) test video exactly its one JSFusion sentence;
MSVD and VATEX videos of every split carry all their captions.

    from i2v.data.retrieval import captions_of, video_id_of, read_metas
    captions_of(sample)   # ["a man is singing", ...] for a webdataset sample {"__key__", "mp4", "json"}
    read_metas(shards)    # [KEY.json dicts] of a pack in sample order, without reading the videos
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path
from typing import Final

from i2v.data.pack import VIDEO_SUFFIXES, _lines

_logger = logging.getLogger(__name__)

TASK: Final = "retrieval"  # index.json "task" of a retrieval pack
META: Final = "json"  # sample member holding the metadata
VIDEO_ID: Final = "video_id"  # metadata key: the dataset's video id
CAPTIONS: Final = "captions"  # metadata key: list of caption strings, annotation-file order

Items = tuple[list[tuple[str, str]], list[list[str]]]  # ([(media path, video id)], [captions of each video])


# ----------------------------------------------------------------------------------------------------------------------
# Reading samples


def meta_of(sample: dict) -> dict:
    """The decoded KEY.json of a webdataset sample (bytes, str or an already-decoded dict).

    Raises:
        ValueError: Naming the key when the member is missing or not JSON with a video id and captions.
    """
    key = sample.get("__key__", "?")
    if META not in sample:
        raise ValueError(f"{key}: no {META} member")
    meta = sample[META]
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}.{META}: not JSON ({e})") from None
    captions = meta.get(CAPTIONS) if isinstance(meta, dict) else None
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{key}.{META}: expected a non-empty '{CAPTIONS}' list of strings (a retrieval pack)")
    if not isinstance(meta.get(VIDEO_ID), str):
        raise ValueError(f"{key}.{META}: expected a '{VIDEO_ID}' string (a retrieval pack)")
    return meta


def captions_of(sample: dict) -> list[str]:
    """Every caption of the sample's video, in annotation-file order."""
    return meta_of(sample)[CAPTIONS]


def video_id_of(sample: dict) -> str:
    """The dataset's id of the sample's video."""
    return meta_of(sample)[VIDEO_ID]


def read_metas(shards: str) -> list[dict]:
    """The KEY.json of every sample of `shards` (a pack directory or pattern), in sample order; videos are skipped.

    The test side of an evaluation rebuilds its caption list and caption -> video map from this, in the same order
    as the (finite, unshuffled) eval loader's samples.
    """
    from i2v.data.wds import _open_shard, expand_shards  # torch-free, but keep this module import-light

    metas = []
    for url in expand_shards(shards):
        stream = _open_shard(url)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(f".{META}"):
                        key = member.name[: -len(META) - 1]
                        metas.append(meta_of({"__key__": key, META: tar.extractfile(member).read()}))
        finally:
            stream.close()
    return metas


# ----------------------------------------------------------------------------------------------------------------------
# Annotation readers -> (items, captions) for `pack(items, out, captions=captions)`


def msrvtt_items(csv_path: str | Path, root: str | Path, data_json: str | Path | None = None) -> Items:
    """MSR-VTT (CLIP4Clip's msrvtt_data.zip) -> items and captions.

    - A split list without a `sentence` column (`MSRVTT_train.9k.csv`, `MSRVTT_train.7k.csv`: column `video_id`):
      each video gets every `sentences[].caption` of `data_json` (MSRVTT_data.json) with its id, in file order.
    - `MSRVTT_JSFUSION_test.csv` (columns `video_id`, `sentence`; 1k-A): each row's video gets exactly its one
      sentence, in row order; `data_json` is not read.

    Videos are `root/<video_id>.mp4` (any video suffix) or a frame folder `root/<video_id>/`.
    """
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"{csv_path}: cannot read ({e.strerror or e})") from None
    columns = set(rows[0]) if rows else set()
    if VIDEO_ID not in columns:
        raise ValueError(f"{csv_path}: expected a header with a 'video_id' column (MSRVTT_train.9k.csv, JSFUSION csv)")
    ids = [(lineno, (row[VIDEO_ID] or "").strip()) for lineno, row in enumerate(rows, start=2)]
    if "sentence" in columns:
        texts = {}
        for (lineno, vid), row in zip(ids, rows, strict=True):
            text = (row["sentence"] or "").strip()
            if not vid or not text:
                raise ValueError(f"{csv_path}:{lineno}: expected a video_id and a sentence, got {row}")
            texts[lineno] = [text]
        return _items(csv_path, ids, lambda lineno, vid: texts[lineno], root)
    if data_json is None:
        raise ValueError(f"{csv_path}: a split list without sentences needs MSRVTT_data.json (--captions)")
    data = _load_json(data_json)
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise ValueError(f"{data_json}: expected an object with a 'sentences' list (MSRVTT_data.json)")
    by_video: dict[str, list[str]] = {}
    for n, s in enumerate(sentences):
        if not isinstance(s, dict) or not isinstance(s.get(VIDEO_ID), str) or not isinstance(s.get("caption"), str):
            raise ValueError(f"{data_json}: sentences[{n}]: expected {{'video_id': str, 'caption': str}}, got {s!r}")
        by_video.setdefault(s[VIDEO_ID], []).append(s["caption"].strip())
    return _items(csv_path, ids, lambda lineno, vid: by_video.get(vid), root, data_json)


def msvd_items(
    list_path: str | Path, captions_path: str | Path, root: str | Path, *, trust_pickle: bool = False
) -> Items:
    """MSVD (CLIP4Clip / collaborative-experts files) -> items and captions.

    `list_path` is `train_list.txt`, `val_list.txt` or `test_list.txt` (one video id per line, list order kept);
    `captions_path` is `raw-captions.pkl` (a pickled dict id -> list of token lists; each caption is its tokens
    joined with spaces) or the same dict as JSON (lists of tokens or plain strings). A pickle is read only with
    `trust_pickle` and then through an unpickler that refuses every class and function (plain data only).
    Videos are `root/<id>.avi` (any video suffix) or a frame folder `root/<id>/`.
    """
    captions = load_caption_dict(captions_path, trust_pickle=trust_pickle)
    return _items(list_path, _id_lines(list_path), lambda lineno, vid: captions.get(vid), root, captions_path)


def vatex_items(list_path: str | Path, json_path: str | Path, root: str | Path) -> Items:
    """VATEX -> items and captions (English `enCap` only, file order).

    `json_path` is the reference loader's `vatex_data.json` (a dict id -> {"enCap": [...]}) or an official release
    file `vatex_{training,validation}_v1.0.json` (a list of {"videoID", "enCap", "chCap"}); `list_path` one video id
    per line (`{train,val,test}_list.txt`, list order kept). Videos are `root/<id>.<video suffix>` or a frame folder
    `root/<id>/` (the reference's `{subset}_video/<id>/`); a listed video without media is rejected, not dropped.
    """
    data = _load_json(json_path)
    if isinstance(data, list):
        entries = {}
        for n, e in enumerate(data):
            if not isinstance(e, dict) or not isinstance(e.get("videoID"), str):
                raise ValueError(f"{json_path}: entry {n}: expected {{'videoID': str, 'enCap': [str, ...]}}")
            entries[e["videoID"]] = e
        data = entries
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected {{id: {{'enCap': [...]}}}} or a list of {{'videoID', 'enCap'}}")

    def captions(lineno: int, vid: str) -> list[str] | None:
        entry = data.get(vid)
        if entry is None:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("enCap"), list):
            raise ValueError(f"{json_path}: video {vid}: expected an 'enCap' list of English captions")
        return [str(c).strip() for c in entry["enCap"]]

    return _items(list_path, _id_lines(list_path), captions, root, json_path)


def load_caption_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, list[str]]:
    """MSVD-style captions: {video id: [caption, ...]} from raw-captions.pkl (token lists) or its JSON form.

    Raises:
        ValueError: For a pickle without `trust_pickle`, a pickle that references any class or function, or a
            mapping that is not id -> list of captions.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = _load_json(path)
    else:
        if not trust_pickle:
            raise ValueError(
                f"{path}: a pickle can run code when loaded; pass --trust-pickle for a file you trust, or convert it "
                "once to JSON (docs/data.md)"
            )
        _logger.warning("%s: unpickling a trusted file (classes and functions are refused, plain data only)", path)
        try:
            data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
        except Exception as e:
            raise ValueError(f"{path}: not a plain-data pickle ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping video id -> list of captions")
    out = {}
    for vid, caps in data.items():
        if not isinstance(caps, list) or not all(isinstance(c, (str, list, tuple)) for c in caps):
            raise ValueError(f"{path}: video {vid}: expected a list of captions (strings or token lists)")
        out[str(vid)] = [(c if isinstance(c, str) else " ".join(map(str, c))).strip() for c in caps]
    return out


class _PlainUnpickler(pickle.Unpickler):
    """Loads only built-in containers and scalars: any class or function reference is an error, so loading cannot
    call code (Python docs, "Restricting Globals")."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused {module}.{name}: only plain data (dict, list, str) is read")


def _items(source, ids: list[tuple[int, str]], captions_of_id, root, captions_file=None) -> Items:
    """Resolves media and captions for (line number, video id) rows; a repeated id or an id without captions is an
    error naming the files and line."""
    media = _media_index(root)
    seen: dict[str, int] = {}
    items, captions = [], []
    for lineno, vid in ids:
        if vid in seen:
            raise ValueError(f"{source}:{lineno}: video {vid!r} repeats line {seen[vid]}")
        seen[vid] = lineno
        caps = captions_of_id(lineno, vid)
        if not caps or not all(caps):
            where = captions_file or source
            raise ValueError(f"{source}:{lineno}: video {vid!r} has no (or an empty) caption in {where}")
        items.append((media.get(vid, str(Path(root) / f"{vid}.mp4")), vid))
        captions.append(list(caps))
    if not items:
        raise ValueError(f"{source}: no videos listed")
    return items, captions


def _media_index(root: str | Path) -> dict[str, str]:
    """{video id: path} of `root`'s video files (by stem, first of VIDEO_SUFFIXES order) and frame folders."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        raise ValueError(f"{root}: cannot list the video folder ({e.strerror or e})") from None
    rank = {s: i for i, s in enumerate(VIDEO_SUFFIXES)}
    found: dict[str, tuple[int, str]] = {}
    for e in entries:
        stem, suffix = os.path.splitext(e.name)
        if suffix.lower() in rank and e.is_file():
            if stem not in found or rank[suffix.lower()] < found[stem][0]:
                found[stem] = (rank[suffix.lower()], e.path)
        elif e.is_dir() and e.name not in found:  # a frame folder; one without images is rejected by the packer
            found[e.name] = (len(rank), e.path)
    return {k: v for k, (_, v) in found.items()}


def _id_lines(path: str | Path) -> list[tuple[int, str]]:
    return [(lineno, line.split()[0]) for lineno, line in _lines(path)]


def _load_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
