"""`i2v eval`, `i2v predict` and `i2v export` on a checkpoint written the way training writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg
from open_clip.transformer import ResidualAttentionBlock
from safetensors.torch import save_file

from i2v.backbone import build_vision_tower, load_visual_state_dict
from i2v.cli import main
from i2v.eval import load_trained
from i2v.export import load_exported
from i2v.methods import create_model
from i2v.train.checkpoint import atomic_save


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from i2v.data.synth import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("synth"), classes=("move_right", "move_left"), train=8, val=6, frames=8, size=32
    )


def make_checkpoint(tmp_path, shards, method: str):
    """A 'pretrained' tiny tower on disk + a trained-looking trainable state, as `i2v train` leaves them."""
    cfg = tiny_cfg(method, f"data.train_shards={shards.train}", f"data.val_shards={shards.val}", "data.size=32")
    cfg.data.num_classes, cfg.data.num_workers, cfg.data.test_clips = 2, 0, 2
    model = create_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    tower = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.visual.state_dict().items()}, tower)
    cfg.backbone.pretrained = str(tower)
    atomic_save({"model": model.trainable_state_dict(), "cfg": cfg.to_dict()}, tmp_path / "final.pt")
    return tmp_path / "final.pt", model.eval()


def test_load_trained_rebuilds_the_same_model(tmp_path, shards):
    ckpt, model = make_checkpoint(tmp_path, shards, "side4video")
    again, _ = load_trained(ckpt)
    x = torch.randn(2, 4, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x))


def test_eval_writes_metrics_and_confusion(tmp_path, shards, capsys):
    ckpt, _ = make_checkpoint(tmp_path, shards, "side4video")
    assert main(["eval", "--checkpoint", str(ckpt), "data.test_crops=3", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert m["val_clips"] == 6 and m["views"] == 2 * 3 and m["labels"] == ["move_right", "move_left"]
    assert sum(map(sum, m["confusion"])) == 6 and len(m["val_per_class"]) == 2 and 0 <= m["val_top1"] <= 1
    assert (tmp_path / "ev/confusion.png").stat().st_size > 0
    assert "top-1" in capsys.readouterr().out


def test_predict_prints_topk_and_reports_bad_files(tmp_path, shards, capsys):
    ckpt, _ = make_checkpoint(tmp_path, shards, "st_adapter")
    video = sorted((Path(shards.val).parents[1] / "videos" / "val").glob("*.mp4"))[0]
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert main(["predict", "--checkpoint", str(ckpt), "--topk", "2", str(video), str(tmp_path / "broken.mp4")]) == 1
    out, err = capsys.readouterr()
    probs = [float(line.split()[0]) for line in out.splitlines()[1:3]]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-4) and probs[0] >= probs[1]
    assert "broken.mp4" in err


def test_export_zeroi2v_is_a_plain_open_clip_tower_plus_head(tmp_path, shards):
    ckpt, model = make_checkpoint(tmp_path, shards, "zeroi2v")
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    x = torch.randn(2, 4, 3, 32, 32)
    expected = model.merge()(x)
    rebuilt = load_exported(out)
    assert all(type(b) is ResidualAttentionBlock for b in rebuilt.backbone.blocks)
    torch.testing.assert_close(rebuilt(x), expected, rtol=1e-4, atol=1e-4)
    from safetensors.torch import load_file

    tensors = load_file(out)
    tower = build_vision_tower(tiny_cfg("zeroi2v").backbone.name)
    load_visual_state_dict(tower, str(out))  # strict: every open_clip key, nothing else under visual.*
    assert not any("adapter" in k for k in tensors)
    with pytest.raises(ValueError, match="not an i2v export"):
        load_exported(tmp_path / "tower.safetensors")


def test_bf16_frozen_weights_predict_on_cpu(tmp_path, shards, capsys):
    ckpt, _ = make_checkpoint(tmp_path, shards, "st_adapter")
    video = sorted((Path(shards.val).parents[1] / "videos" / "val").glob("*.mp4"))[0]
    assert main(["predict", "--checkpoint", str(ckpt), str(video), "--set", "backbone.precision=bf16"]) == 0
    assert "move_" in capsys.readouterr().out


def test_eval_and_predict_take_a_pack_directory_and_name_a_missing_one(tmp_path, shards, capsys):
    ckpt, _ = make_checkpoint(tmp_path, shards, "side4video")
    val_dir, train_dir = Path(shards.val).parent, Path(shards.train).parent
    assert main(["eval", "--checkpoint", str(ckpt), f"data.val_shards={val_dir}", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["val_clips"] == 6
    missing = tmp_path / "val-typo"
    assert main(["eval", "--checkpoint", str(ckpt), f"data.val_shards={missing}", "--out", str(tmp_path / "x")]) == 2
    assert f"data.val_shards: 1 of 1 shards do not exist, e.g. {missing}" in capsys.readouterr().err
    video = sorted((val_dir.parent / "videos" / "val").glob("*.mp4"))[0]
    overrides = [f"data.train_shards={train_dir}", f"data.val_shards={missing}"]
    assert main(["predict", "--checkpoint", str(ckpt), str(video), "--set", *overrides]) == 0
    assert "move_" in capsys.readouterr().out  # label names from the directory's labels.json


def test_evaluate_normalises_uint8_clips_on_the_device():
    from i2v.data.transforms import normalize
    from i2v.eval import evaluate

    video = torch.randint(0, 256, (3, 2, 4, 3, 8, 8), dtype=torch.uint8)
    label = torch.tensor([0, 1, 1])
    seen = []

    def forward(x):
        seen.append(x)
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), -x.mean(dim=(1, 2, 3, 4))], -1)

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    m = evaluate(forward, [(video, label)], 2, torch.device("cpu"), mean=mean, std=std)
    assert m["val_clips"] == 3 and len(seen) == 1
    torch.testing.assert_close(seen[0], normalize(video, mean, std).flatten(0, 1))
