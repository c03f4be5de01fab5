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
    for randaugment in (False, True):
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
