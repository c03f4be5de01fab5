"""i2v.data.wds: exactly-once and resampled splits, determinism, corrupt samples, views, clip-consistent transforms."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import broken_and_odd_inputs, packed_stamps, write_tar, write_video

from i2v.config import DataCfg
from i2v.data import build_eval_loader, build_train_loader, read_shard_index, steps_per_epoch
from i2v.data.pack import pack
from i2v.data.transforms import eval_transform, train_transform
from i2v.data.wds import _open_shard


def _cfg(pattern: str, **kw) -> DataCfg:
    base = dict(
        train_shards=pattern,
        val_shards=pattern,
        frames=4,
        size=32,
        batch_size=4,
        num_workers=2,
        flip=False,
        shuffle_buffer=8,
        num_classes=3,
    )
    return DataCfg(**{**base, **kw})


def _labels_by_key(pattern: str) -> dict[str, int]:
    """Expected label per sample key, from the json members written by the packer."""
    import tarfile

    out = {}
    for url in read_shard_index(pattern):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    out[f"{url}#{m.name[:-4]}"] = int(tar.extractfile(m).read())
    return out


@pytest.mark.parametrize("shard_samples", [5, 12])  # 5 uneven shards (>= 4 slots), then 2 shards (< 4 slots)
def test_round_trip_exactly_once_over_ranks_and_workers(tmp_path, shard_samples):
    pattern = packed_stamps(tmp_path, 22, shard_samples=shard_samples)
    cfg = _cfg(pattern)
    expected = _labels_by_key(pattern)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, resampled=False, with_keys=True)
        for video, label, keys in loader:
            assert video.dtype == torch.uint8 and video.shape[1:] == (4, 3, 32, 32) and label.dtype == torch.int64
            assert video.shape[0] == len(label) == len(keys) <= 4
            assert label.tolist() == [expected[k] for k in keys]
            seen += keys
        assert loader.skipped.count == 0
    assert len(seen) == len(set(seen)) == 22 and set(seen) == set(expected)


def test_labels_match_content(tmp_path):
    pattern = packed_stamps(tmp_path, 9, classes=3)  # background grey = 100 + 10 * class
    cfg = _cfg(pattern, scale=[1.0, 1.0], num_workers=0)
    for video, label in build_train_loader(cfg, resampled=False):
        grey = video[:, :, :, 24:, :].float().mean(dim=(1, 2, 3, 4))  # below the stamp rows
        np.testing.assert_allclose(grey.numpy(), 100 + 10 * label.numpy(), atol=3)


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(tmp_path):
    pattern = packed_stamps(tmp_path, 22, shard_samples=5)  # shards of 5,5,5,5,2
    cfg = _cfg(pattern)
    assert steps_per_epoch(cfg, world_size=2) == 22 // (2 * 4)
    assert steps_per_epoch(_cfg(pattern, epoch_clips=40), world_size=2) == 5
    for rank in range(2):
        loader = build_train_loader(_cfg(pattern, epoch_clips=40), rank=rank, world_size=2)
        assert len(loader) == 5
        for _ in range(2):
            batches = [label for _, label in loader]
            assert len(batches) == 5 and all(len(b) == 4 for b in batches)
        assert loader.epoch == 2


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    pattern = packed_stamps(tmp_path, 16, shard_samples=4)
    cfg = _cfg(pattern, num_workers=1)

    def run(seed, epoch):
        loader = build_train_loader(cfg, seed=seed, epoch=epoch, resampled=False, with_keys=True)
        batches = list(loader)
        return [k for *_, keys in batches for k in keys], torch.cat([v for v, *_ in batches])

    keys_a, video_a = run(0, 0)
    keys_b, video_b = run(0, 0)
    assert keys_a == keys_b and torch.equal(video_a, video_b)  # same order, same crops and frame offsets
    keys_c, _ = run(0, 1)
    keys_d, _ = run(1, 0)
    assert sorted(keys_c) == sorted(keys_a) and keys_c != keys_a and keys_d != keys_a


def test_corrupt_samples_are_skipped_counted_and_reported(tmp_path):
    good = write_video(tmp_path / "good.mp4", t=8).read_bytes()
    shard0 = write_tar(
        tmp_path / "shard-000000.tar",
        [
            ("a.mp4", good),
            ("a.cls", b"0"),
            ("b.mp4", b"\x00garbage" * 100),
            ("b.cls", b"1"),  # undecodable
            ("c.cls", b"1"),  # no video
            ("d.mp4", good),
            ("d.cls", b"2"),
        ],
    )
    write_tar(
        tmp_path / "shard-000001.tar",
        [("e.mp4", good), ("e.cls", b"0"), ("f.mp4", good), ("f.cls", b"1")],
        truncate_to=len(good) + 1536,
    )
    (tmp_path / "index.json").write_text(json.dumps({"shards": {"shard-000000.tar": 4, "shard-000001.tar": 2}}))
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    cfg = _cfg(pattern, num_workers=2, batch_size=2)
    write_tar(tmp_path / "shard-000002.tar", [])
    loader = build_eval_loader(cfg, with_keys=True)
    (tmp_path / "shard-000002.tar").unlink()  # gone after the loader was built (storage hiccup): skipped, counted
    keys = [k.split("#")[1] for *_, ks in loader for k in ks]
    assert sorted(keys) == ["a", "d", "e"]
    skipped = dict(loader.skipped.samples)
    assert loader.skipped.count == len(skipped) == 4
    assert skipped[f"{shard0}#b"].startswith("not a readable video container")
    assert skipped[f"{shard0}#c"].startswith("no video member")
    assert skipped[str(tmp_path / "shard-000001.tar")] == "ReadError: unexpected end of data"  # f is lost with it
    assert "No such file" in skipped[str(tmp_path / "shard-000002.tar")]
    assert loader.skipped.summary().startswith("4 samples skipped")


def test_odd_inputs_read_in_an_epoch(tmp_path):
    good, _ = broken_and_odd_inputs(tmp_path / "in")
    pattern = pack(
        [(str(p), name) for name, p in good.items()], tmp_path / "out", shard_samples=2, workers=1, progress=False
    )
    cfg = _cfg(
        pattern,
        num_workers=0,
        frames=8,
        sampler="dense",
        stride=2,
        test_clips=2,
        test_crops=3,
        batch_size=3,
        num_classes=len(good),
    )
    loader = build_eval_loader(cfg)
    shapes = [tuple(v.shape) for v, _ in loader]
    assert loader.skipped.count == 0
    assert sum(s[0] for s in shapes) == len(good) and all(s[1:] == (6, 8, 3, 32, 32) for s in shapes)


def test_eval_views_and_partial_last_batch(tmp_path):
    pattern = packed_stamps(tmp_path, 5, shard_samples=5)
    cfg = _cfg(pattern, test_clips=2, test_crops=3, num_workers=0)
    batches = list(build_eval_loader(cfg))
    assert [tuple(v.shape) for v, _ in batches] == [(4, 6, 4, 3, 32, 32), (1, 6, 4, 3, 32, 32)]
    assert [len(label) for _, label in batches] == [4, 1]


def test_eval_split_is_exactly_once_across_ranks(tmp_path):
    pattern = packed_stamps(tmp_path, 7, shard_samples=3)
    cfg = _cfg(pattern, num_workers=2)
    keys = [k for r in range(3) for *_, ks in build_eval_loader(cfg, rank=r, world_size=3, with_keys=True) for k in ks]
    assert len(keys) == len(set(keys)) == 7


def test_train_transform_is_clip_consistent():
    frame = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).clone()  # (T, C, H, W), identical frames
    for randaugment in (None, "rand-m7-n4-mstd0.5-inc1"):
        transform = train_transform(24, randaugment=randaugment)
        for seed in range(10):
            torch.manual_seed(seed)
            out = transform(clip)
            assert out.shape == (6, 3, 24, 24) and torch.equal(out, out[:1].expand_as(out))


def test_flip_switch():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(4, 3, 32, 32).contiguous()  # brighter to the right

    def flips(flip):
        t = train_transform(32, scale=(1.0, 1.0), flip=flip)
        return Counter(bool(t(ramp)[0, 0, 0, 0] > t(ramp)[0, 0, 0, -1]) for _ in range(40))

    assert flips(False) == Counter({False: 40})
    assert flips(True)[True] > 5


def test_eval_transform_three_crops_cover_the_long_side():
    clip = torch.arange(96, dtype=torch.uint8).expand(2, 3, 32, 96).contiguous()  # column index as value
    out = eval_transform(32, crops=3)(clip)
    assert out.shape == (3, 2, 3, 32, 32) and out.dtype == torch.uint8
    assert out[:, 0, 0, 0, 0].tolist() == [0, 32, 64]


def test_config_mistakes_fail_early_and_broken_data_does_not_hang(tmp_path):
    pattern = packed_stamps(tmp_path, 4, classes=3)
    with pytest.raises(ValueError, match="label map has 3 classes but data.num_classes is 2"):
        build_train_loader(_cfg(pattern, num_classes=2))
    for i in range(4):
        (tmp_path / f"garbage-{i}.tar").write_bytes(b"not a tar" * 100)
    broken = _cfg(str(tmp_path / "garbage-{0..3}.tar"), epoch_clips=8, num_workers=0)
    with pytest.raises(RuntimeError, match="the shards ran dry after 0 of 2 batches"):
        next(iter(build_train_loader(broken)))  # resampled: raises instead of spinning


def test_missing_index_and_empty_config_errors(tmp_path):
    write_tar(tmp_path / "x.tar", [])
    with pytest.raises(FileNotFoundError, match="index.json: cannot read the packer.s index.json"):
        steps_per_epoch(_cfg(str(tmp_path / "x.tar")))
    assert steps_per_epoch(_cfg(str(tmp_path / "x.tar"), epoch_clips=64, batch_size=8), world_size=2) == 4
    with pytest.raises(ValueError, match="data.val_shards is empty"):
        build_eval_loader(_cfg("", val_shards=""))


# ----------------------------------------------------------------------------------------------------------------------
# Dealing shards over ranks x loader workers (evaluation: read once; training: one permutation per epoch)


def _slot_pass(monkeypatch, loader, worker: int, workers: int, opened: Counter) -> list[str]:
    """Runs one (rank, loader worker) slot of `loader` in this process, counting shard opens; returns its keys."""
    from types import SimpleNamespace

    import i2v.data.wds as wds

    def counting_open(url):
        opened[url] += 1
        return _open_shard(url)

    monkeypatch.setattr(wds, "_open_shard", counting_open)
    monkeypatch.setattr(wds, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    return [k for _, _, keys, _ in loader.stream for k in keys]


@pytest.mark.parametrize(
    "ranks, workers, shards, reads",  # reads: how many slots open each shard per pass, in shard order
    [
        (3, 2, 7, [1] * 7),  # at least as many shards as slots: each shard once
        (2, 2, 3, [1, 2, 1]),  # rank 0 deals shards 0 and 2 to its workers; rank 1's workers split shard 1's samples
        (2, 4, 2, [4, 4]),  # one shard per rank, its 4 workers split its samples
        (4, 2, 2, [4, 4]),  # fewer shards than ranks: the ranks split samples, each rank's workers split the shards
        (2, 2, 1, [4]),  # fewer shards than both: every slot reads the shard and keeps a quarter
    ],
)
def test_eval_pass_reads_each_shard_as_few_times_as_the_deal_allows(
    monkeypatch, tmp_path, ranks, workers, shards, reads
):
    pattern = packed_stamps(tmp_path, 14, shard_samples=2)  # 7 shards of 2 samples
    pattern = pattern.replace("000006}", f"{shards - 1:06d}}}")  # the first `shards` of them
    cfg = _cfg(pattern, num_workers=workers, batch_size=3)
    expected = _labels_by_key(pattern)
    opened, keys = Counter(), []
    for rank in range(ranks):
        loader = build_eval_loader(cfg, rank=rank, world_size=ranks, with_keys=True)
        for worker in range(workers):
            keys += _slot_pass(monkeypatch, loader, worker, workers, opened)
    assert sorted(keys) == sorted(expected)  # every sample exactly once
    assert [opened[url] for url in read_shard_index(pattern)] == reads  # today's main: every slot reads every shard


def test_fewer_shards_than_slots_warns_once_with_the_counts(monkeypatch, tmp_path, caplog):
    import i2v.data.wds as wds

    monkeypatch.setattr(wds, "_warned", set())
    pattern = packed_stamps(tmp_path, 6, shard_samples=2)  # 3 shards
    with caplog.at_level("WARNING", logger="i2v.data.wds"):
        for _ in range(2):
            build_eval_loader(_cfg(pattern, num_workers=4), rank=0, world_size=2)
        build_eval_loader(_cfg(pattern, num_workers=4), rank=1, world_size=2)
        build_eval_loader(_cfg(pattern, num_workers=1), rank=0, world_size=3)  # 3 shards for 3 slots: fine
    warnings = [r.getMessage() for r in caplog.records if r.name == "i2v.data.wds"]  # not the packer's INFO lines
    assert len(warnings) == 1
    assert "3 shards for 2 ranks x 4 loader workers = 8 slots: shards are read up to 4 times per pass" in warnings[0]


def _epoch_keys(cfg, ranks: int, **kw) -> list[list[str]]:
    """The sample keys each rank's training loader yields in one pass, batch by batch (real loader workers)."""
    out = []
    for rank in range(ranks):
        loader = build_train_loader(cfg, rank=rank, world_size=ranks, with_keys=True, **kw)
        batches = [keys for *_, keys in loader]
        assert len(batches) == len(loader) == steps_per_epoch(cfg, ranks)  # fixed steps on every rank
        out.append([k for keys in batches for k in keys])
    return out


@pytest.mark.parametrize("shard_samples", [4, 16])  # 8 shards for 8 slots, then 2 shards for 8 slots (deal samples)
def test_a_training_epoch_reads_every_sample_once_before_any_twice(tmp_path, shard_samples):
    pattern = packed_stamps(tmp_path, 32, shard_samples=shard_samples)
    cfg = _cfg(pattern, num_workers=2, batch_size=2)  # 4 ranks x 2 workers, 4 steps of 2 clips per rank
    everything = sorted(_labels_by_key(pattern))
    epoch0 = _epoch_keys(cfg, 4, seed=3, epoch=0)
    assert sorted(k for keys in epoch0 for k in keys) == everything  # today's main: ~1/3 unseen, others repeated
    assert _epoch_keys(cfg, 4, seed=3, epoch=0) == epoch0  # deterministic for (seed, epoch)
    epoch1 = _epoch_keys(cfg, 4, seed=3, epoch=1)
    assert sorted(k for keys in epoch1 for k in keys) == everything and epoch1 != epoch0  # a fresh permutation


def test_a_slot_that_finishes_its_deal_goes_on_with_the_next_permutation(tmp_path):
    pattern = packed_stamps(tmp_path, 15, shard_samples=3)  # 5 shards of 3
    cfg = _cfg(pattern, num_workers=2, batch_size=2, epoch_clips=60)  # 15 steps per rank: 4 passes' worth
    per_rank = _epoch_keys(cfg, 2, seed=1)
    seen = Counter(k for keys in per_rank for k in keys)
    assert len(seen) == 15 and sum(seen.values()) == 60
    assert max(seen.values()) - min(seen.values()) <= 2  # every deal is a full pass: near-uniform, never stalls


# ----------------------------------------------------------------------------------------------------------------------
# uint8 up to the device, normalised there


@pytest.mark.parametrize("randaugment", [False])  # RandAugment is timm's now (tests/test_transforms.py)
def test_uint8_transforms_then_normalize_match_the_float_pipeline(randaugment):
    from torchvision.transforms import v2

    from i2v.data.transforms import CLIP_MEAN, CLIP_STD, MultiCrop, normalize

    clip = torch.randint(0, 256, (4, 3, 40, 56), dtype=torch.uint8)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(CLIP_MEAN), list(CLIP_STD))]
    ops = [v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip()]
    old_train = v2.Compose(ops + ([v2.RandAugment()] if randaugment else []) + to_float)  # today's main, float out
    new_train = train_transform(24)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = old_train(clip)
        torch.manual_seed(seed)
        out = new_train(clip)
        assert out.dtype == torch.uint8
        torch.testing.assert_close(normalize(out, CLIP_MEAN, CLIP_STD), expected, atol=1e-6, rtol=1e-6)
    old_eval = v2.Compose([v2.Resize(24, antialias=True), MultiCrop(24, 3), *to_float])
    out = eval_transform(24, crops=3)(clip)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 3, 24, 24)
    torch.testing.assert_close(normalize(out, CLIP_MEAN, CLIP_STD), old_eval(clip), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="expects uint8 clips"):
        normalize(normalize(out, CLIP_MEAN, CLIP_STD), CLIP_MEAN, CLIP_STD)  # never twice


def test_loaders_yield_uint8_and_eval_batches_follow_eval_batch_size(tmp_path):
    pattern = packed_stamps(tmp_path, 7, shard_samples=7)
    for video, _ in build_train_loader(_cfg(pattern, num_workers=1, epoch_clips=8)):
        assert video.dtype == torch.uint8 and video.shape == (4, 4, 3, 32, 32)
    cfg = _cfg(pattern, num_workers=1, test_clips=2, eval_batch_size=3)
    batches = [video for video, _ in build_eval_loader(cfg)]
    assert [tuple(v.shape) for v in batches] == [(3, 2, 4, 3, 32, 32)] * 2 + [(1, 2, 4, 3, 32, 32)]
    assert all(v.dtype == torch.uint8 for v in batches)
    for unset in (0, None):  # falls back to data.batch_size
        sizes = [len(label) for _, label in build_eval_loader(_cfg(pattern, num_workers=0, eval_batch_size=unset))]
        assert sizes == [4, 3]


def test_eval_batch_size_is_validated():
    from i2v.config import ConfigError, load_config

    assert load_config(None, ["data.eval_batch_size=16"]).data.eval_batch_size == 16
    assert load_config(None, ["data.eval_batch_size=null"]).data.eval_batch_size is None
    with pytest.raises(ConfigError, match="eval_batch_size: -1 must be >= 0"):
        load_config(None, ["data.eval_batch_size=-1"])
