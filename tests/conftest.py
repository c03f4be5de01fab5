"""Shared fixtures: tiny random-initialised open_clip towers (offline, CPU, milliseconds per forward)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from i2v.config import ExperimentCfg, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = str(ROOT / "configs/backbones/i2v-tiny-vit.json")  # 32 px, patch 8 (4x4 grid), width 64, 4 heads, 4 blocks
TINY_EVA = str(ROOT / "configs/backbones/i2v-tiny-eva.json")  # timm eva02_tiny_patch14_224 inside open_clip

# Per-method overrides that shrink the trainable part to the tiny backbone.
TINY_METHOD = {
    "linear_probe": [],
    "full_finetune": [],
    "st_adapter": ["method.bottleneck=16"],
    "zeroi2v": [],
    "side4video": ["method.side_width=32", "method.side_head_dim=16"],
    "m_adapter": ["method.width=32", "method.num_heads=2"],
}


def tiny_cfg(method: str, *overrides: str, frames: int = 4, num_classes: int = 5) -> ExperimentCfg:
    return load_config(
        None,
        [
            f"backbone.name={TINY_VIT}",
            f"method.name={method}",
            f"data.frames={frames}",
            f"data.num_classes={num_classes}",
            *TINY_METHOD[method],
            *overrides,
        ],
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
