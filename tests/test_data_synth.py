"""i2v.data.synth and the `i2v data synth | stats` commands: time-reversal pairs, order invariance, determinism."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from i2v.cli import main
from i2v.data import read_label_map
from i2v.data.synth import CLASSES, REVERSED, make_synthetic, render_clip
from i2v.data.video import decode_frames


@pytest.mark.parametrize("name", CLASSES)
def test_each_class_is_the_time_reversal_of_its_pair(name):
    for seed in range(3):
        clip = render_clip(name, np.random.default_rng(seed), frames=8, height=32, width=40)
        assert clip.shape == (8, 32, 40, 3) and clip.dtype == np.uint8
        partner = render_clip(REVERSED[name], np.random.default_rng(seed), frames=8, height=32, width=40)
        np.testing.assert_array_equal(clip[::-1], partner)
        assert np.abs(np.diff(clip.astype(int), axis=0)).mean() > 1  # the content changes over time


def _pair_features(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled frames (n, T, 8*8*3) of n clips alternating between `name` (label 0) and its reversal (label 1)."""
    clips = [
        render_clip((name, REVERSED[name])[i % 2], np.random.default_rng([seed, i]), frames=8, height=32, width=32)
        for i in range(n)
    ]
    x = np.stack(clips).astype(np.float64) / 255  # (n, T, 32, 32, 3)
    return x.reshape(n, 8, 8, 4, 8, 4, 3).mean(axis=(3, 5)).reshape(n, 8, -1), np.arange(n) % 2


def _logistic_accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    a, b = torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    head = torch.nn.Linear(a.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(a), torch.tensor(y_train)).backward()
        opt.step()
    return float((head(b).argmax(1).numpy() == y_test).mean())


@pytest.mark.parametrize("name", ["move_right", "rotate_cw", "grow", "appear"])
def test_frame_averaging_model_is_at_chance_but_order_is_informative(name):
    train, y_train = _pair_features(name, 240, seed=1)
    test, y_test = _pair_features(name, 160, seed=2)

    def invariant(f):  # mean and spread over time: blind to frame order
        return np.concatenate([f.mean(1), f.std(1)], -1)

    assert _logistic_accuracy(invariant(train), y_train, invariant(test), y_test) <= 0.5 + 0.12
    if name != "rotate_cw":  # control: a crude order-aware feature, the time trend of colour saturation, solves it

        def trend(f):  # objects are saturated, backgrounds are not
            saturation = f.reshape(*f.shape[:2], -1, 3).max(-1) - f.reshape(*f.shape[:2], -1, 3).min(-1)  # (n, T, 64)
            return (saturation * np.linspace(-1, 1, f.shape[1])[None, :, None]).mean(1)

        assert _logistic_accuracy(trend(train), y_train, trend(test), y_test) >= 0.9


def _videos(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")}


def test_make_synthetic_is_deterministic_and_packed(tmp_path):
    kw = dict(classes=("grow", "shrink", "appear"), train=6, val=3, frames=8, size=32, shard_samples=4)
    a = make_synthetic(tmp_path / "a", seed=3, **kw)
    make_synthetic(tmp_path / "b", seed=3, **kw)
    make_synthetic(tmp_path / "c", seed=4, **kw)
    assert a.train == str(tmp_path / "a/train/shard-{000000..000001}.tar") and a.val.endswith("val/shard-000000.tar")
    for name in ("train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"):
        assert _videos(tmp_path / "a" / name) == _videos(tmp_path / "b" / name)
    assert _videos(tmp_path / "a/train/shard-000000.tar") != _videos(tmp_path / "c/train/shard-000000.tar")
    assert read_label_map(a.train) == ["grow", "shrink", "appear"]
    index = json.loads((tmp_path / "a/train/index.json").read_text())
    assert index["samples"] == 6 and index["classes"] == {"grow": 2, "shrink": 2, "appear": 2}
    # the mp4 decodes back to the rendered frames (up to compression)
    rendered = render_clip("shrink", np.random.default_rng([3, 0, 1]), frames=8, height=32, width=32)
    decoded = decode_frames((tmp_path / "a/videos/train/000001_shrink.mp4").read_bytes(), lambda n: np.arange(n))
    assert decoded.shape == rendered.shape and np.abs(decoded.astype(int) - rendered).mean() < 8
    assert make_synthetic(tmp_path / "a", seed=3, **kw) == a  # re-run: reuses videos and shards
    with pytest.raises(ValueError, match="other settings"):
        make_synthetic(tmp_path / "a", seed=5, **kw)


def test_cli_synth_then_stats_json(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--classes",
                "move_right,move_left",
                "--train",
                "8",
                "--val",
                "2",
                "--frames",
                "8",
                "--size",
                "32",
            ]
        )
        == 0
    )
    pattern = capsys.readouterr().out.split("train: ")[1].split()[0]
    report_path = tmp_path / "stats.json"
    assert (
        main(
            [
                "data",
                "stats",
                pattern,
                "--frames",
                "4",
                "--size",
                "32",
                "--sampler",
                "dense",
                "--stride",
                "2",
                "--batch-size",
                "3",
                "--json",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert report["clips"] == 8 and report["skipped"] == 0 and report["clips_per_s"] > 0
    assert report["labels"] == {"move_right": 4, "move_left": 4} and report["video_shape"] == [4, 3, 32, 32]
    assert "clips:    8" in capsys.readouterr().out
