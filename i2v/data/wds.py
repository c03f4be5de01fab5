"""WebDataset clip pipeline driven by `DataCfg`: the only way training and evaluation read videos.

Shards are named the way users name them (`expand_shards`): brace patterns, `::`-separated lists, globs, a directory
written by `i2v data pack` (all its shards, in index order); local, `file://`, `pipe:`, http(s), and anything fsspec
opens, e.g. `s3://`. A local path or pattern that matches nothing is an error naming it.

Stages, each a generator inside one DataLoader worker (see `ClipStream.__iter__`), per cycle over the shards:
  1. the cycle's shard order (one permutation per (seed, epoch, cycle), the same on every slot) -> this (rank, loader
     worker) slot's deal (`deal_shards`): shards over ranks, then over each rank's workers; a level with fewer shards
     than parts deals samples instead (each part reads the shards and keeps every n-th sample)
  2. tar members -> samples {__key__, <video ext> or 00000.jpg 00001.jpg ..., cls, json}  (tar errors: skipped, counted)
  3. a subset's key filter (`i2v data subset`), then the deal's sample filters  (exactly-once split)
  4. seeded shuffle buffer (training), drained at the end of the cycle
  5. decode of the sampled frames only (PyAV with seeking, or the sampled JPEG/PNG members of a frame sequence)
     -> uint8 clip transform (decode errors: skipped, counted)
  6. batches uint8 (B, T, C, H, W) / (B, V, T, C, H, W), plus the skips seen since the previous batch
Clips stay uint8 up to the device: consumers call `transforms.normalize` after the (pinned, non_blocking) copy.

Modes:
- resampled (training): a slot goes through its deal of cycle 0, then of cycle 1 (a fresh permutation), ... and the
  loader stops after `steps_per_epoch` batches, the same number on every rank, so collectives never wait for a rank
  that ran out of data (a finite `split_by_node` with uneven shards hangs DDP/ZeRO-3, SYSTEMS.md section 4.1).
  Cycle 0 is one pass: over an epoch every shard is read once before any is read twice.
- finite (evaluation, `i2v data stats`, training-free reading): cycle 0 only, so every sample exactly once over
  ranks x workers. The last partial batch is kept.

Retrieval shards (`task: retrieval`) carry no `cls`: each sample holds `KEY.json` = {"video_id": str, "captions":
[str, ...]} beside the video. Training expands every sample into one sample per caption before the shuffle buffer
(stage 3), so an epoch covers every (video, caption) pair once, as the reference does, and the pairs of one video
are spread over batches; the label of a pair is {"video_id", "caption"}. Evaluation keeps one sample per video with
{"video_id", "captions"}. Steps per epoch count pairs: the index.json's "captions" (samples' captions per shard)
when the packer wrote it, else a scan of the shards' json members.

Randomness (shard order, shuffle buffer, frame offsets, augmentation) is a function of (seed, epoch, slot) only.
Skipped samples travel with the batches to the main process and are counted in `VideoLoader.skipped`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from i2v.config import DataCfg
from i2v.data.pack import VIDEO_SUFFIXES
from i2v.data.transforms import eval_transform, train_transform
from i2v.data.video import decode_frames, decode_image_frames, dense_indices, segment_indices

_logger = logging.getLogger(__name__)

VIDEO_EXTS: Final = tuple(s.lstrip(".") for s in VIDEO_SUFFIXES)
MAX_SKIP_KEYS: Final = 10_000  # keys kept by a SkipCounter; counts are always exact
MAX_FAILED_IN_A_ROW: Final = 1000  # resampled mode: this many undecodable samples in a row is a broken dataset
FRAME_MEMBER: Final = re.compile(r"^(\d+)\.(jpg|jpeg|png)$")  # one image of a frame sequence: KEY.00012.jpg


class SkipCounter:
    """Samples the pipeline dropped, with reasons. Lives in the main process; loaders fill it batch by batch.

    Attributes:
        reasons: Counter of reason strings.
        samples: (key, reason) pairs, the first MAX_SKIP_KEYS of them; a key is "SHARD_URL#SAMPLE_KEY", or the shard
            URL alone for shard-level failures (unreadable or truncated tar).
    """

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.samples: list[tuple[str, str]] = []

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def add(self, key: str, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.samples) < MAX_SKIP_KEYS:
            self.samples.append((key, reason))

    def summary(self) -> str:
        top = "; ".join(f"{n}x {r}" for r, n in self.reasons.most_common(5))
        return f"{self.count} samples skipped" + (f" ({top})" if top else "")

    def to_dict(self) -> dict:
        return {"skipped": self.count, "reasons": dict(self.reasons), "keys": [list(s) for s in self.samples]}


# ----------------------------------------------------------------------------------------------------------------------
# Shard lists, the shard index and the label map


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs, in order, from what users pass: the one resolution behind every place that accepts shards.

    After brace expansion and `::` splitting, each local item is
      - a directory holding `index.json` (an `i2v data pack` output): all of its shards, in index order; for an
        `i2v data subset` directory, the source shards holding its clips (readers keep only its keys, `subset_keys`);
      - a glob (`*`, `?`, `[`): the sorted matching files;
      - else a shard file, which must exist.
    Remote URLs (`s3://`, `http://`, `pipe:`, ...) pass through unchecked.

    Raises:
        FileNotFoundError: For a local item that matches nothing (the message names it).
        ValueError: For an empty pattern.
    """
    urls, missing = [], []
    for url in expand_urls(shards if isinstance(shards, str) else list(shards)):
        path = _local_path(url)
        if path is None:
            urls.append(url)
        elif Path(path).is_dir():
            index = Path(path) / "index.json"
            if not index.is_file():
                raise FileNotFoundError(
                    f"{url}: a directory without index.json; give an `i2v data pack` output directory or a shard "
                    f"pattern such as {Path(path) / 'shard-{000000..000009}.tar'}"
                )
            urls += list(_dir_index(path))
        elif any(c in path for c in "*?["):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"{url}: no file matches")
            urls += matches
        else:
            urls.append(url)
            if not Path(path).is_file():
                missing.append(url)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"{shards!r}: no shards named")
    return urls


def _dir_index(path: str) -> dict[str, int]:
    """Samples per shard of a pack (or subset) directory, from its index.json, keyed by shard path in index order.

    A subset's shards live in its source pack (names relative to the subset directory, normalised here).
    """
    index = Path(path) / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not an `i2v data pack` index ({e})") from None
    return {os.path.normpath(Path(path) / name): n for name, n in shards.items()}


def subset_keys(shards: str) -> frozenset[str] | None:
    """The sample keys a subset directory (`i2v data subset`) keeps, or None when `shards` names no subset.

    Raises:
        ValueError: When a subset directory is combined with other shards (its keys would filter them too).
    """
    items = expand_urls(shards)
    for url in items:
        path = _local_path(url)
        index = Path(path) / "index.json" if path is not None else None
        if index is None or not index.is_file():
            continue
        subset = json.loads(index.read_text()).get("subset")
        if subset is None:
            continue
        if len(items) > 1:
            raise ValueError(f"{shards!r}: the subset directory {url} cannot be combined with other shards")
        return frozenset(subset["keys"])
    return None


def _local_path(url: str) -> str | None:
    """The file-system path of a local shard URL (plain path or `file://`), None for remote URLs and `pipe:`."""
    if url.startswith("pipe:"):
        return None
    scheme = urlparse(url).scheme
    if scheme == "file":
        return urlparse(url).path
    return url if scheme == "" or len(scheme) == 1 else None  # one letter: a Windows drive


def read_label_map(shard_dir_or_pattern: str | Path) -> list[str]:
    """Class names in index order, from the `labels.json` written by the packer next to the shards.

    Args:
        shard_dir_or_pattern: A shard directory, or a shard pattern/URL (the file is looked up next to its first shard).

    Raises:
        FileNotFoundError: When labels.json cannot be read (the message names the path).
        ValueError: For `pipe:` URLs (no place to look) or an empty pattern.
    """
    return json.loads(_read_sibling(shard_dir_or_pattern, "labels.json"))


def read_shard_index(shard_dir_or_pattern: str | Path) -> dict[str, int]:
    """Samples per shard URL, from the `index.json` next to the shards.

    A directory gives every shard listed in its index; a pattern gives only the shards it names.

    Raises:
        FileNotFoundError: When index.json cannot be read or a local shard does not exist (the message names it).
        ValueError: When a named shard is not in its directory's index, for `pipe:` URLs or an empty pattern.
    """
    where = _local_path(str(shard_dir_or_pattern))
    if where is not None and Path(where).is_dir():  # a pack or subset directory: its own index
        expand_shards(where)  # every shard must exist
        return _dir_index(where)
    counts, indexes = {}, {}
    for url in expand_shards(str(shard_dir_or_pattern)):
        parent = url.rsplit("/", 1)[0] if "/" in url else "."
        if parent not in indexes:
            indexes[parent] = json.loads(_read_sibling(url, "index.json"))["shards"]
        name = url.rsplit("/", 1)[-1]
        if name not in indexes[parent]:
            raise ValueError(f"{url}: not listed in {parent}/index.json (re-run `i2v data pack`)")
        counts[url] = indexes[parent][name]
    return counts


def count_samples(shards: str) -> int:
    """Samples in the shards named by a pattern, as counted by the shard index."""
    return sum(read_shard_index(shards).values())


@functools.lru_cache(maxsize=16)  # once per process: every epoch's loader asks again
def count_captions(shards: str) -> int:
    """(video, caption) pairs in retrieval shards: the index.json's "captions" (the pack's total when the pattern
    names every shard, or a per-shard mapping), else a scan of the shards (only the json members are parsed;
    malformed samples count 0)."""
    urls = expand_shards(shards)
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(_read_sibling(shards, "index.json"))
        per, names = index.get("captions"), {u.rsplit("/", 1)[-1] for u in urls}
        keys = subset_keys(shards)
        if isinstance(per, int) and (keys is not None or names == set(index.get("shards", {}))):
            return per  # a pack's total when every shard is named (`i2v data pack`, `synth --captions`); a subset's
        if isinstance(per, dict) and names <= set(per):
            return sum(int(per[name]) for name in names)
    _logger.info('%s: counting captions by reading the shards (index.json has no "captions")', shards)
    keys, n, skips = subset_keys(shards), 0, []
    for sample in _tar_samples(urls, skips):
        if keys is None or sample["__key__"] in keys:
            with contextlib.suppress(ValueError):
                n += len(caption_meta(sample)["captions"])
    return n


def _read_sibling(shard_dir_or_pattern: str | Path, name: str) -> str:
    where = str(shard_dir_or_pattern)
    if not where:
        raise ValueError(f"no shard directory or pattern given to look up {name}")
    if Path(where).is_dir():
        url = str(Path(where) / name)
    else:
        first = expand_shards(where)[0]
        if first.startswith("pipe:"):
            raise ValueError(f"{first}: cannot locate {name} next to a pipe: URL; give the shard directory instead")
        url = f"{first.rsplit('/', 1)[0]}/{name}" if "/" in first else name
    try:
        if urlparse(url).scheme in ("", "file"):
            return Path(urlparse(url).path if url.startswith("file:") else url).read_text()
        import fsspec

        with fsspec.open(url, "rt") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"{url}: cannot read the packer's {name} ({e})") from None


def _open_shard(url: str):
    """Opens a shard stream: webdataset's gopen for its schemes (local, file, pipe, http(s), gs, ...), else fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def deal_shards(
    order: Sequence[str], rank: int, world_size: int, worker: int, workers: int
) -> tuple[list[str], list[tuple[int, int]]]:
    """One (rank, loader worker) slot's share of `order`: its shards, and the sample filters to apply to their stream.

    Shards are dealt over the ranks first, then over each rank's loader workers. A level with fewer shards than parts
    deals samples instead: each of its parts reads the same shards and keeps every parts-th sample, given as a
    (part, parts) filter. Over all slots every sample is kept exactly once; a shard is read by one slot when there
    are at least as many shards as slots, by a few otherwise (by every slot only when there are fewer shards than
    both ranks and workers).

    Returns:
        (shards, [(part, parts), ...]): keep sample i of the filtered stream when i % parts == part, filter by filter.
    """
    shards, keep = list(order), []
    for part, parts in ((rank, world_size), (worker, workers)):
        if len(shards) >= parts:
            shards = shards[part::parts]
        else:
            keep.append((part, parts))
    return shards, keep


def shard_reads(shards: int, world_size: int, workers: int) -> int:
    """How many slots read the most-read shard in one pass of the deal (1: every shard is read once)."""
    reads = Counter(
        shard
        for rank in range(world_size)
        for worker in range(workers)
        for shard in deal_shards(range(shards), rank, world_size, worker, workers)[0]
    )
    return max(reads.values(), default=0)


_warned: set[tuple] = set()


def _warn_few_shards(what: str, shards: int, world_size: int, num_workers: int) -> None:
    """Once per process (on rank 0): fewer shards than slots means some shards are read by several slots."""
    workers = max(1, num_workers)
    key = (what, shards, world_size, workers)
    if shards >= world_size * workers or key in _warned:
        return
    _warned.add(key)
    _logger.warning(
        "%s: %d shards for %d ranks x %d loader workers = %d slots: shards are read up to %d times per pass (each "
        "slot keeps its share of the samples); pack at least %d shards (`i2v data pack --shard-samples`) to read "
        "each once",
        what,
        shards,
        world_size,
        workers,
        world_size * workers,
        shard_reads(shards, world_size, workers),
        world_size * workers,
    )


def steps_per_epoch(cfg: DataCfg, world_size: int = 1, pairs: bool = False) -> int:
    """Training batches per epoch on every rank: `cfg.epoch_clips` (or the shard index's total) x `cfg.num_repeats` //
    (ranks x batch): an epoch is one pass over the videos, each giving `num_repeats` samples. With `pairs`
    (retrieval) the total is the number of (video, caption) pairs (`count_captions`)."""
    count = count_captions if pairs else count_samples
    clips = (cfg.epoch_clips or count(cfg.train_shards)) * cfg.num_repeats
    return max(1, clips // (world_size * cfg.batch_size))


# ----------------------------------------------------------------------------------------------------------------------
# The per-sample clip function and the stream


@dataclass
class ClipSpec:
    """How one sample becomes one clip tensor (picklable, so it can cross into loader workers).

    A sample holds a video file (one member with a video extension) or a frame sequence (members `00000.jpg`,
    `00001.jpg`, ... in frame order by number; `.png` too): both go through the same sampler plan, and only the
    sampled frames are decoded.
    """

    frames: int
    sampler: Literal["segment", "dense"]
    stride: int
    train: bool
    clips: int  # temporal views (test mode)
    transform: object  # uint8 -> uint8; train: (T,C,H,W) -> (T,C,H,W); eval: (T,C,H,W) -> (crops,T,C,H,W)
    threads: int = 1
    flip_labels: dict[int, int] = dataclasses.field(default_factory=dict)  # train: label -> label of the mirrored clip
    repeats: int = 1  # train: independently augmented samples per decoded clip (repeated augmentation)
    target: Literal["cls", "captions"] = "cls"  # the label: the `cls` member, or the captions of `json` (retrieval)

    def __call__(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor, int | dict]:
        ext = next((e for e in VIDEO_EXTS if e in sample), None)
        images = sorted((int(m[1]), k) for k in sample if (m := FRAME_MEMBER.match(k))) if ext is None else []
        if ext is None and not images:
            raise ValueError(
                f"no video member nor image frames (has {sorted(k for k in sample if not k.startswith('__'))})"
            )
        if self.target == "captions":
            meta = caption_meta(sample)
            if "__caption__" in sample:  # a training pair (ClipStream's caption expansion)
                label = {"video_id": meta["video_id"], "caption": meta["captions"][sample["__caption__"]]}
            else:
                label = meta
        elif "cls" not in sample:
            raise ValueError("no cls member")
        else:
            label = int(sample["cls"])
        np_rng = np.random.default_rng(rng.getrandbits(64))

        def plan(n: int) -> np.ndarray:  # (clips, T) frame indices once the frame count is known
            if self.sampler == "segment":
                return segment_indices(n, self.frames, clips=self.clips, train=self.train, rng=np_rng)
            return dense_indices(n, self.frames, self.stride, clips=self.clips, train=self.train, rng=np_rng)

        if ext is not None:
            frames = decode_frames(sample[ext], plan, threads=self.threads)  # (clips, T, H, W, 3) uint8
        else:
            frames = decode_image_frames([sample[k] for _, k in images], plan)
        video = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)  # (clips, T, C, H, W)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
            torch.manual_seed(rng.getrandbits(63))
            if self.train and self.repeats > 1:  # one decode, R augmentations: (R, T, C, H, W), (R,) labels
                views = [self._augment(video[0], label) for _ in range(self.repeats)]
                return torch.stack([v for v, _ in views]), torch.tensor([y for _, y in views])
            if self.train:
                return self._augment(video[0], label)  # (T, C, H, W)
            return torch.cat([self.transform(v) for v in video]), label  # (clips * crops, T, C, H, W)

    def _augment(self, clip: torch.Tensor, label: int) -> tuple[torch.Tensor, int]:
        if not self.flip_labels:
            return self.transform(clip), label
        clip, flipped = self.transform.with_flip(clip)
        return clip, self.flip_labels.get(label, label) if flipped else label


def caption_meta(sample: dict) -> dict:
    """The {"video_id": str, "captions": [str, ...]} of a retrieval sample's json member (ValueError if malformed)."""
    if "json" not in sample:
        raise ValueError("no json member (retrieval shards hold KEY.json with video_id and captions)")
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise ValueError(f"json member is not valid JSON: {e}") from None
    caps = meta.get("captions") if isinstance(meta, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("video_id"), str)
        or not isinstance(caps, list)
        or not caps
        or not all(isinstance(c, str) for c in caps)
    ):
        want = '{"video_id": str, "captions": [str, ...] (non-empty)}'
        raise ValueError(f"json member: expected {want}, got {str(meta)[:200]}")
    return {"video_id": meta["video_id"], "captions": caps}


def _expand_captions(samples: Iterator[dict], skips: list) -> Iterator[dict]:
    """One sample per (video, caption) pair: shallow copies (the video bytes are shared) with `__caption__`."""
    for sample in samples:
        try:
            n = len(caption_meta(sample)["captions"])
        except ValueError as e:
            skips.append((f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}", str(e)[:300]))
            continue
        for i in range(n):
            yield sample | {"__caption__": i}


def flip_label_map(pairs: Sequence[Sequence[str]], names: Sequence[str]) -> dict[int, int]:
    """Label ids to swap under a horizontal flip, from class-name pairs and the label map (names in id order).

    Raises:
        ValueError: For a name the label map does not hold (the message names it).
    """
    ids = {name: i for i, name in enumerate(names)}
    swap = {}
    for a, b in pairs:
        for name in (a, b):
            if name not in ids:
                raise ValueError(
                    f"data.flip_label_pairs: {name!r} is not a class of the label map ({len(names)} names)"
                )
        swap[ids[a]], swap[ids[b]] = ids[b], ids[a]
    return swap


class ClipStream(IterableDataset):
    """Yields (video, label, keys, skips) batches for one (rank, loader worker) slot; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        clip: ClipSpec,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        resampled: bool,
        shuffle: bool,
        shuffle_buffer: int,
        keys: frozenset[str] | None = None,
        pairs: bool = False,
    ) -> None:
        if not urls:
            raise ValueError("no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.urls, self.clip, self.batch_size = list(urls), clip, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle, self.shuffle_buffer = resampled, shuffle, shuffle_buffer
        self.keys = keys  # a subset's sample keys: every other sample is dropped before the deal's filters
        self.pairs = pairs  # retrieval training: one sample per (video, caption) pair, before the shuffle
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{slots}")
        skips: list[tuple[str, str]] = []  # filled by the stages, drained into each batch
        samples = self._samples(worker, workers, rng, skips)  # stages 1-4
        yield from self._batches(self._clips(samples, rng, skips), skips)  # 5. decode + transform, 6. batch

    def shard_order(self, cycle: int) -> list[str]:
        """The shards of one cycle, in the order they are dealt: the same on every slot, so the deals are disjoint."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/{cycle}").shuffle(order)
        return order

    def _samples(self, worker: int, workers: int, rng: random.Random, skips: list) -> Iterator[dict]:
        for cycle in itertools.count() if self.resampled else range(1):
            shards, keep = deal_shards(self.shard_order(cycle), self.rank, self.world_size, worker, workers)
            samples = _tar_samples(shards, skips)
            if self.keys is not None:
                samples = (s for s in samples if s["__key__"] in self.keys)
            for part, parts in keep:
                samples = itertools.islice(samples, part, None, parts)
            if self.pairs:
                samples = _expand_captions(samples, skips)
            if self.shuffle and self.shuffle_buffer > 1:  # per cycle: no sample of the next cycle comes out early
                samples = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            empty = True
            for sample in samples:
                empty = False
                yield sample
            if empty:  # nothing readable in a whole deal: this slot is done (VideoLoader raises if a rank runs dry)
                return

    def _clips(self, samples: Iterator[dict], rng: random.Random, skips: list) -> Iterator[tuple]:
        failed = 0  # in a row
        for sample in samples:
            key = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
            try:
                video, label = self.clip(sample, rng)
                views = zip(video, label.tolist()) if torch.is_tensor(label) else [(video, label)]  # repeats
            except Exception as e:  # a corrupt sample is counted, never fatal
                skips.append((key, _reason(e)))
                failed += 1
                if self.resampled and failed >= MAX_FAILED_IN_A_ROW:
                    raise RuntimeError(f"{failed} samples in a row failed to decode, e.g. {skips[-1]}") from e
                continue
            failed = 0
            for view, view_label in views:
                yield view, view_label, key

    def _batches(self, clips: Iterator[tuple], skips: list) -> Iterator[tuple]:
        batch = []
        for item in clips:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield _collate(batch, skips)
                batch = []
        if batch or skips:  # the partial batch (finite mode), or a carrier for the last skips
            yield _collate(batch, skips)


def _collate(batch: list[tuple], skips: list) -> tuple:
    drained = list(skips)
    skips.clear()
    if not batch:
        return None, None, [], drained
    videos, labels, keys = zip(*batch, strict=True)
    labels = list(labels) if isinstance(labels[0], dict) else torch.tensor(labels, dtype=torch.int64)  # captions
    return torch.stack(videos), labels, list(keys), drained


def _tar_samples(urls: Sequence[str], skips: list) -> Iterator[dict]:
    """Samples of each shard in turn; tar-level errors are recorded in `skips`."""
    for url in urls:

        def handler(e: Exception, url=url) -> bool:
            skips.append((url, _reason(e)))
            return True

        try:
            stream = _open_shard(url)
        except Exception as e:
            handler(e)
            continue
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            yield from group_by_keys(files, handler=handler)
        finally:
            stream.close()


def _reason(e: Exception) -> str:
    # webdataset appends (stream, url) to the args of the exceptions it passes on: keep the message only
    text = str(e) if isinstance(e, OSError) and e.strerror else str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {text}"[:300] if not isinstance(e, ValueError) else text[:300]


# ----------------------------------------------------------------------------------------------------------------------
# Loaders


class VideoLoader:
    """An iterable of uint8 batches over one epoch at a time, with the skipped-sample counter.

    Iterating starts a fresh DataLoader whose workers see the current epoch; each pass then advances the epoch (or
    call `set_epoch`). Resampled loaders have `len()` = batches per epoch, identical on every rank, and raise when the
    shards run dry before that (every slot found nothing readable in a whole deal). Batches are in pinned memory when
    CUDA is available: copy them with `.to(device, non_blocking=True)`, then `transforms.normalize`.

    Attributes:
        skipped: A SkipCounter accumulating over every pass.
        epoch: The epoch of the next pass.
    """

    def __init__(self, stream: ClipStream, *, num_workers: int, steps: int | None, epoch: int, with_keys: bool):
        self.stream, self.num_workers, self.steps, self.with_keys = stream, num_workers, steps, with_keys
        self.epoch = epoch
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("a finite loader has no fixed number of batches per rank")
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple]:
        self.stream.epoch = self.epoch
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init,
            prefetch_factor=2 if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )
        before, done = self.skipped.count, 0
        try:
            for video, label, keys, skips in loader:
                for key, reason in skips:
                    self.skipped.add(key, reason)
                if video is None:
                    continue
                yield (video, label, keys) if self.with_keys else (video, label)
                done += 1
                if done == self.steps:
                    break
            else:
                if self.steps is not None:  # the other ranks would wait for this one's missing batches forever
                    raise RuntimeError(
                        f"the shards ran dry after {done} of {self.steps} batches of epoch {self.epoch} "
                        f"(nothing readable left to deal; {self.skipped.summary()}, e.g. "
                        f"{self.skipped.samples[-1] if self.skipped.samples else 'none'})"
                    )
        finally:
            if self.skipped.count > before:
                _logger.warning(
                    "epoch %d: %d samples skipped so far; %s", self.epoch, self.skipped.count, self.skipped.summary()
                )
            self.epoch += 1


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding parallelism comes from the workers themselves


def _check_num_classes(cfg: DataCfg, shards: str) -> None:
    """Fails early when the shards hold more classes than the model head (when labels.json can be read)."""
    try:
        n = len(read_label_map(shards))
    except (OSError, ValueError) as e:
        _logger.debug("class count not checked: %s", e)
        return
    if n > cfg.num_classes:
        raise ValueError(f"{shards}: the label map has {n} classes but data.num_classes is {cfg.num_classes}")


def build_train_loader(
    cfg: DataCfg,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = True,
    with_keys: bool = False,
    shards: str | None = None,
    captions: bool = False,
) -> VideoLoader:
    """The training loader: yields (video uint8 (B, T, C, H, W), label int64 (B,)); `transforms.normalize` the video
    on the device. With `captions` (retrieval shards) one sample per (video, caption) pair and labels are a list of
    {"video_id", "caption"}.

    Resampled mode deals one permutation of the shards per (seed, epoch) over all ranks x loader workers, so an epoch
    reads every shard once before any twice; a slot that has gone through its deal goes on with the next
    permutation's deal, so every rank yields exactly `len(loader)` batches.

    Args:
        cfg: Data config (train_shards, batch_size, num_workers, frames, sampler, stride, size, flip, randaugment,
            scale, shuffle_buffer, epoch_clips).
        rank: This training worker's rank.
        world_size: Number of training workers.
        seed: Base seed; with `epoch` and the slot it fixes every random choice.
        epoch: Epoch of the first pass.
        resampled: True: exactly `steps_per_epoch(cfg, world_size)` batches per pass on every rank (training).
            False: every sample exactly once over all ranks and workers, last partial batch kept (for
            training-free reading such as `i2v data stats`).
        with_keys: Also yield the list of sample keys ("SHARD_URL#KEY") as a third element.
        shards: Shard pattern overriding `cfg.train_shards`.
    """
    shards = shards or cfg.train_shards
    if not shards:
        raise ValueError(
            "data.train_shards is empty: give a shard pattern, e.g. 'data/train/shard-{000000..000009}.tar'"
        )
    urls = expand_shards(shards)
    if not captions:
        _check_num_classes(cfg, shards)
    if rank == 0:
        _warn_few_shards(f"training shards {shards}", len(urls), world_size, cfg.num_workers)
    transform = train_transform(
        cfg.size,
        scale=cfg.scale,
        flip=cfg.flip,
        randaugment=cfg.randaugment,
        randaugment_at=cfg.randaugment_at,
        resize=cfg.train_resize,
        short_side_jitter=cfg.short_side_jitter,
        grayscale_p=cfg.grayscale_p,
        random_erasing=cfg.random_erasing,
        random_erasing_mode=cfg.random_erasing_mode,
        resize_interpolation=cfg.resize_interpolation,
        crop_interpolation=cfg.crop_interpolation,
    )
    swap = {}
    if cfg.flip and cfg.flip_label_pairs and not captions:
        try:
            swap = flip_label_map(cfg.flip_label_pairs, read_label_map(shards))
        except (OSError, ValueError) as e:
            raise ValueError(f"data.flip_label_pairs needs the class names of {shards}: {e}") from None
    clip = ClipSpec(cfg.frames, cfg.sampler, cfg.stride, train=True, clips=1, transform=transform)
    clip.flip_labels, clip.repeats = swap, cfg.num_repeats
    clip.target = "captions" if captions else "cls"
    stream = ClipStream(
        urls,
        clip,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resampled=resampled,
        shuffle=True,
        shuffle_buffer=cfg.shuffle_buffer,
        keys=subset_keys(shards),
        pairs=captions,
    )
    steps = steps_per_epoch(dataclasses.replace(cfg, train_shards=shards), world_size, captions) if resampled else None
    return VideoLoader(stream, num_workers=cfg.num_workers, steps=steps, epoch=epoch, with_keys=with_keys)


def eval_transform_for(cfg: DataCfg):
    """The test transform `cfg` asks for (size, test_crops, test_resize, test_crop_offsets, resize_interpolation)."""
    return eval_transform(
        cfg.size,
        crops=cfg.test_crops,
        resize=cfg.test_resize,
        offsets=cfg.test_crop_offsets,
        interpolation=cfg.resize_interpolation,
    )


def build_eval_loader(
    cfg: DataCfg,
    *,
    rank: int = 0,
    world_size: int = 1,
    with_keys: bool = False,
    shards: str | None = None,
    captions: bool = False,
) -> VideoLoader:
    """The evaluation loader: every sample of `cfg.val_shards` exactly once over all ranks and loader workers.
    With `captions` (retrieval shards) labels are a list of {"video_id", "captions"}.

    Yields (video uint8 (B, V, T, C, H, W), label int64 (B,)) with V = test_clips x test_crops (clip-major) and
    B <= `cfg.eval_batch_size` (or `cfg.batch_size`); `transforms.normalize` the video on the device. The last partial
    batch is kept, so ranks may see different numbers of batches: gather metrics, not per-step collectives. Shards
    are dealt over ranks, then over each rank's workers (`deal_shards`); with fewer shards than slots some shards are
    read by several slots (a warning says how many).

    Args:
        cfg: Data config (val_shards, eval_batch_size, batch_size, num_workers, frames, sampler, stride, size,
            test_clips, test_crops).
        rank: This worker's rank.
        world_size: Number of workers.
        with_keys: Also yield the list of sample keys as a third element.
        shards: Shard pattern overriding `cfg.val_shards`.
    """
    shards = shards or cfg.val_shards
    if not shards:
        raise ValueError("data.val_shards is empty: give a shard pattern, e.g. 'data/val/shard-{000000..000003}.tar'")
    urls = expand_shards(shards)
    if not captions:
        _check_num_classes(cfg, shards)
    if rank == 0:
        _warn_few_shards(f"validation shards {shards}", len(urls), world_size, cfg.num_workers)
    transform = eval_transform_for(cfg)
    clip = ClipSpec(cfg.frames, cfg.sampler, cfg.stride, train=False, clips=cfg.test_clips, transform=transform)
    clip.target = "captions" if captions else "cls"
    stream = ClipStream(
        urls,
        clip,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
        resampled=False,
        shuffle=False,
        shuffle_buffer=0,
        keys=subset_keys(shards),
    )
    return VideoLoader(stream, num_workers=cfg.num_workers, steps=None, epoch=0, with_keys=with_keys)
