"""Every shipped experiment config parses, names a real open_clip pretrained tag, and builds (on meta)."""

from __future__ import annotations

import open_clip
import pytest
from conftest import ROOT

from i2v.config import load_config
from i2v.methods import create_model

EXPERIMENTS = sorted((ROOT / "configs/experiments").glob("*.yaml"))


def test_there_is_a_config_per_headline_setting():
    names = {p.stem for p in EXPERIMENTS}
    for method in ("side4video", "st_adapter", "zeroi2v"):
        for backbone in ("vit-b16", "vit-l14"):
            for dataset in ("k400", "ssv2"):
                assert any(n.startswith(f"{method}_{backbone}") and n.endswith(dataset) for n in names)
    for dataset in ("k400", "ssv2", "ssv1"):
        for backbone in ("vit-b16", "vit-l14", "eva02-e14"):
            assert any(n.startswith(f"side4video_{backbone}") and n.endswith(dataset) for n in names)
    for dataset in ("hmdb51", "ucf101"):
        assert any(n.startswith("zeroi2v_vit-b16") and n.endswith(dataset) for n in names)
    assert any(n.startswith("zeroi2v_vit-l14") and "-f32_" in n and n.endswith("k400") for n in names)
    assert any(n.startswith("full_finetune_") for n in names)


@pytest.mark.parametrize("path", EXPERIMENTS + [ROOT / "configs/smoke.yaml"], ids=lambda p: p.stem)
def test_experiment_config_builds(path):
    cfg = load_config(path)
    if cfg.backbone.pretrained:
        assert open_clip.get_pretrained_cfg(cfg.backbone.name, cfg.backbone.pretrained), cfg.backbone.pretrained
    model = create_model(cfg, device="meta")
    assert sum(p.numel() for p in model.trainable_parameters()) > 0
