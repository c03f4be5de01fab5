"""The method registry: one name -> one `VideoMethod` class, built from its config dataclass.

model = create_model(cfg)                       # ExperimentCfg -> backbone + method
list_methods()                                  # ['full_finetune', 'linear_probe', 'm_adapter', ...]
"""

from __future__ import annotations

import torch

from i2v.backbone import VideoBackbone, load_backbone
from i2v.config import METHOD_CFGS, ExperimentCfg, MethodCfg
from i2v.methods.base import VideoMethod

METHODS: dict[str, type[VideoMethod]] = {}


def register_method(name: str):
    """Class decorator adding a `VideoMethod` to the registry under `name` (which must have a config dataclass)."""

    def add(cls: type[VideoMethod]) -> type[VideoMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        if name not in METHOD_CFGS:
            raise ValueError(f"method {name!r} has no config dataclass in i2v.config.METHOD_CFGS")
        cls.cfg_cls = METHOD_CFGS[name]
        METHODS[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    return sorted(METHODS)


def create_method(cfg: MethodCfg, backbone: VideoBackbone, num_classes: int, num_frames: int) -> VideoMethod:
    """Builds method `cfg.name` around `backbone` (on the backbone's device)."""
    if cfg.name not in METHODS:
        raise KeyError(f"method.name: unknown method {cfg.name!r}; choose one of {list_methods()}")
    param = next(backbone.parameters())
    with param.device:
        return METHODS[cfg.name](cfg, backbone, num_classes=num_classes, num_frames=num_frames)


def create_model(cfg: ExperimentCfg, device: torch.device | str | None = None) -> VideoMethod:
    """Backbone (loaded and frozen) + method, from an experiment config. `device="meta"` allocates nothing."""
    backbone = load_backbone(cfg.backbone, device=device)
    return create_method(cfg.method, backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames)


# Importing the method modules registers them.
from i2v.methods import full_finetune, linear_probe, m_adapter, side4video, st_adapter, zeroi2v  # noqa: E402, F401

__all__ = ["METHODS", "VideoMethod", "create_method", "create_model", "list_methods", "register_method"]
