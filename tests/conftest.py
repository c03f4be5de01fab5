"""Shared fixtures: tiny random-initialised open_clip towers (offline, CPU, milliseconds per forward)."""

from __future__ import annotations

import os
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
        list(overrides),  # may replace the tiny defaults below (each key once per layer)
        defaults=[
            f"backbone.name={TINY_VIT}",
            f"method.name={method}",
            f"data.frames={frames}",
            f"data.num_classes={num_classes}",
            *TINY_METHOD[method],
        ],
    )


class ClipWrapper(torch.nn.Module):
    """A vision tower as the `visual` child of a CLIP-like module (what OpenAI's TorchScript archives hold)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        return self.visual(x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A private local Ray cluster per test module: its own temp dir, no auth token, never an existing cluster
    (RAY_ADDRESS is ignored), DeepSpeed on the CPU accelerator. Per module, so that what one module's runs leave
    behind (Tune trial actors, Train placement groups, a submitted job) cannot stall the next module's trials."""
    import ray

    saved = os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu")
    temp = f"/tmp/i2v-ray-{os.getpid()}-{request.module.__name__[5:13]}"  # short: socket paths stay under 107 bytes
    ray.init(address="local", num_cpus=4, include_dashboard=True, _temp_dir=temp)
    yield
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved
