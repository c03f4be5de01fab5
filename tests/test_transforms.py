"""The reference recipes' augmentations: clip-consistent ops, flip label swaps by class name, repeated augmentation,
test-time resize and crop offsets."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import write_video
from torchvision.transforms import v2

import i2v.data.wds as wds
from i2v.config import ConfigError, DataCfg, load_config
from i2v.data.pack import pack
from i2v.data.transforms import TrainTransform, eval_transform, train_transform
from i2v.data.wds import ClipSpec, build_eval_loader, build_train_loader, flip_label_map

S4V_SSV2_PAIRS = [
    ["Pulling something from left to right", "Pulling something from right to left"],
    ["Pushing something from left to right", "Pushing something from right to left"],
    ["Turning the camera left while filming something", "Turning the camera right while filming something"],
]

# Each op at probability 1 where it has one, in every position it can take.
OPS = {
    "randaugment_s4v": dict(randaugment="rand-m7-n4-mstd0.5-inc1", randaugment_at="before_resize"),
    "randaugment_before_crop": dict(randaugment="rand-m7-n4-mstd0.5-inc1", resize=[48]),
    "randaugment_after_flip": dict(randaugment="rand-m9-n2-mstd0.5", randaugment_at="after_flip"),
    "grayscale": dict(grayscale_p=1.0),
    "erasing_const": dict(random_erasing=1.0),
    "erasing_rand": dict(random_erasing=1.0, random_erasing_mode="rand"),
    "resize_short_bicubic": dict(resize=[44], resize_interpolation="bicubic", crop_interpolation="bicubic"),
    "resize_hw": dict(resize=[40, 50]),
    "short_side_jitter": dict(short_side_jitter=[24, 30]),
    "everything": dict(
        randaugment="rand-m7-n4-mstd0.5-inc1", resize=[40, 50], grayscale_p=1.0, random_erasing=1.0, flip=True
    ),
}


@pytest.mark.parametrize("kw", OPS.values(), ids=OPS.keys())
def test_every_train_op_is_clip_consistent(kw):
    frame = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).clone()  # (T, C, H, W), identical frames
    transform = train_transform(24, **kw)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(clip)
        assert out.shape == (6, 3, 24, 24) and out.dtype == torch.uint8
        assert torch.equal(out, out[:1].expand_as(out)), f"seed {seed}: frames differ"
        outs.append(out)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # the op is random across clips


def test_ops_do_what_they_say():
    clip = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    gray = train_transform(24, grayscale_p=1.0, flip=False)(clip)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.manual_seed(0)
    erased = train_transform(24, scale=(1, 1), random_erasing=1.0, flip=False)(torch.zeros_like(clip))
    assert (erased == 128).any() and set(erased.unique().tolist()) <= {0, 128}
    torch.manual_seed(0)
    noisy = train_transform(24, scale=(1, 1), random_erasing=1.0, random_erasing_mode="rand", flip=False)(
        torch.zeros_like(clip)
    )
    assert len(noisy.unique()) > 50  # uniform random pixels in the box
    # the RandAugment policy string is parsed by timm: 4 ops per clip with inc1
    assert len(train_transform(24, randaugment="rand-m7-n4-mstd0.5-inc1").before.transforms[0].op.ops) == 15
    with pytest.raises(ValueError, match="not a timm RandAugment policy"):
        train_transform(24, randaugment="rand-x7")


def test_randaugment_restores_the_global_rngs():
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    train_transform(24, randaugment="rand-m7-n4-mstd0.5-inc1")(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert (random.random(), np.random.rand()) == expected


def test_flip_label_map_uses_names_not_ids():
    names = sorted(n for pair in S4V_SSV2_PAIRS for n in pair) + ["Other"]
    swap = flip_label_map(S4V_SSV2_PAIRS, names)
    assert {names[a]: names[b] for a, b in swap.items()}["Pushing something from left to right"] == (
        "Pushing something from right to left"
    )
    reordered = list(reversed(names))  # another label map: other ids, same classes
    swap2 = flip_label_map(S4V_SSV2_PAIRS, reordered)
    assert {reordered[a]: reordered[b] for a, b in swap2.items()} == {names[a]: names[b] for a, b in swap.items()}
    assert swap != swap2
    with pytest.raises(ValueError, match="'Pushing left' is not a class"):
        flip_label_map([["Pushing left", "Other"]], names)


def test_a_flipped_left_to_right_clip_carries_the_right_to_left_label(tmp_path):
    lr, rl = "Pushing something from left to right", "Pushing something from right to left"
    items = [(str(write_video(tmp_path / f"v{i}.mp4", t=8)), [rl, "Other", lr][i % 3]) for i in range(6)]
    labels = ["Other", rl, lr]  # not sorted: ids follow this map, the swap follows the names
    pattern = pack(items, tmp_path / "shards", labels=labels, shard_samples=6, workers=1, progress=False)
    cfg = DataCfg(train_shards=pattern, frames=4, size=32, batch_size=6, num_workers=0, num_classes=3, shuffle_buffer=0)
    for flip_p, expect in ((0.0, {"Other": "Other", lr: lr, rl: rl}), (1.0, {"Other": "Other", lr: rl, rl: lr})):
        loader = build_train_loader(
            DataCfg(**{**cfg.__dict__, "flip": True, "flip_label_pairs": [[lr, rl]]}), with_keys=True
        )
        loader.stream.clip.transform.flip_p = flip_p  # every clip flipped, or none
        video, label, keys = next(iter(loader))
        truth = {f"v{i}": name for i, (_, name) in enumerate(items)}
        got = {k.rsplit("_", 1)[1]: labels[y] for k, y in zip(keys, label.tolist(), strict=True)}  # "..#0000000_v0"
        assert {truth[k]: got[k] for k in got} == expect
    with pytest.raises(ValueError, match="'Pulling something from left to right' is not a class"):
        build_train_loader(DataCfg(**{**cfg.__dict__, "flip_label_pairs": S4V_SSV2_PAIRS}))


def test_repeated_augmentation_decodes_once(tmp_path, monkeypatch):
    items = [(str(write_video(tmp_path / f"v{i}.mp4", t=8)), f"c{i % 2}") for i in range(4)]
    pattern = pack(items, tmp_path / "shards", shard_samples=4, workers=1, progress=False)
    decodes = []
    real = wds.decode_frames

    def counting(*a, **kw):
        decodes.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(wds, "decode_frames", counting)
    cfg = DataCfg(train_shards=pattern, frames=4, size=16, batch_size=4, num_workers=0, num_classes=2, num_repeats=2)
    loader = build_train_loader(cfg, with_keys=True)
    assert len(loader) == 2  # an epoch is one pass over the 4 videos, 2 samples each, batches of 4 clips
    batches = list(loader)
    keys = [k for _, _, ks in batches for k in ks]
    assert len(keys) == 8 and len(decodes) == 4  # 8 samples from 4 decodes
    for video, label, ks in batches:
        assert ks[0] == ks[1] and ks[2] == ks[3] and label[0] == label[1]  # the repeats share a batch
        assert not torch.equal(video[0], video[1])  # ... and are augmented independently


def test_repeats_must_divide_the_batch():
    with pytest.raises(ConfigError, match="num_repeats: 3 must be >= 1 and divide batch_size=8"):
        load_config(None, ["data.num_repeats=3"])


def test_old_boolean_randaugment_is_a_clear_error_and_false_is_off():
    with pytest.raises(ConfigError, match="randaugment: true is no longer accepted"):
        load_config(None, ["data.randaugment=true"])
    assert load_config(None, ["data.randaugment=false"]).data.randaugment is None
    with pytest.raises(ConfigError, match="'rand-q3' is not a timm RandAugment policy"):
        load_config(None, ["data.randaugment=rand-q3"])


def test_side4video_test_resize_and_full_res_crop_offsets():
    clip = torch.arange(320, dtype=torch.int32).expand(2, 3, 256, 320).to(torch.uint8)  # column index (mod 256)
    cols = torch.arange(320).expand(1, 1, 256, 320)
    out = eval_transform(224, crops=3, resize=[256, 320], offsets="full_res")(clip)
    assert out.shape == (3, 2, 3, 224, 224)
    assert out[:, 0, 0, 0, 0].tolist() == [cols[0, 0, 0, x].item() % 256 for x in (0, 96, 48)]  # S-h, W 320
    rows = torch.arange(256, dtype=torch.uint8)[:, None].expand(2, 3, 256, 320)
    assert eval_transform(224, crops=3, resize=[256, 320], offsets="full_res")(rows)[:, 0, 0, 0, 0].tolist() == [16] * 3
    portrait = torch.zeros(1, 3, 400, 256, dtype=torch.uint8)  # full_res crops along the width even for portrait
    assert eval_transform(224, crops=3, resize=[256], offsets="full_res")(portrait).shape == (3, 1, 3, 224, 224)


def test_test_resize_reaches_the_eval_loader(tmp_path):
    items = [(str(write_video(tmp_path / "v.mp4", t=8, h=48, w=64)), "c0")]
    pattern = pack(items, tmp_path / "shards", shard_samples=1, workers=1, progress=False)
    cfg = DataCfg(
        val_shards=pattern, frames=2, size=16, num_workers=0, num_classes=1, test_crops=3, test_resize=[16, 40]
    )
    video, _ = next(iter(build_eval_loader(cfg)))
    ref = eval_transform(16, crops=3, resize=[16, 40])
    assert video.shape == (1, 3, 2, 3, 16, 16) and ref.transforms[0].size == [16, 40]


def test_train_transform_flip_reports_itself():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(2, 3, 32, 32).contiguous()
    t = TrainTransform(v2.Identity(), 1.0, v2.Identity())
    out, flipped = t.with_flip(ramp)
    assert flipped and torch.equal(out, ramp.flip(-1))
    spec = ClipSpec(4, "segment", 1, train=True, clips=1, transform=t, flip_labels={0: 1, 1: 0})
    assert spec._augment(ramp, 0)[1] == 1 and spec._augment(ramp, 2)[1] == 2


def test_i2v_train_validates_flip_label_names_before_any_worker(tmp_path):
    from conftest import tiny_cfg

    from i2v.train.driver import validate

    items = [(str(write_video(tmp_path / f"v{i}.mp4", t=8)), f"c{i}") for i in range(2)]
    pattern = pack(items, tmp_path / "shards", shard_samples=2, workers=1, progress=False)
    shards = f"data.train_shards={pattern}"
    validate(tiny_cfg("linear_probe", shards, "data.flip_label_pairs=[[c0, c1]]", num_classes=2))
    with pytest.raises(ConfigError, match="'Pushing left' is not a class of the label map"):
        validate(tiny_cfg("linear_probe", shards, "data.flip_label_pairs=[[c0, Pushing left]]", num_classes=2))
