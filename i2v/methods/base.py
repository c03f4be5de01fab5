"""The contract every method implements: a video in, class logits out, and a clear split of what trains."""

from __future__ import annotations

import torch
from torch import nn

from i2v.backbone import VideoBackbone
from i2v.config import MethodCfg


class VideoMethod(nn.Module):
    """A video recogniser built on a (usually frozen) image backbone.

    Subclasses build their trainable modules in `__init__` and implement `forward(video (B, T, C, H, W)) -> (B, K)`.
    The backbone stays registered as `self.backbone` (so `.to()`, `state_dict()` and ZeRO-3 partitioning see it).
    """

    cfg_cls: type[MethodCfg] = MethodCfg
    #: True when the backward pass never enters the backbone (side networks): the trainer may then run the backbone
    #: under no_grad in its own optimizer-less ZeRO-3 engine.
    backbone_no_grad: bool = False

    def __init__(self, cfg: MethodCfg, backbone: VideoBackbone, num_classes: int, num_frames: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_frames = num_frames

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def no_weight_decay(self) -> set[str]:
        """Names (as in `named_parameters()`) of trainable parameters exempt from weight decay beyond the usual
        1-d rule (norms, biases), e.g. embeddings."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward where the method supports it (in-backbone adapters)."""

    def merge(self) -> VideoMethod:
        """Returns the inference model with train-time structure folded away. Identity except for ZeroI2V."""
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the frozen backbone: trainable parameters plus buffers outside the backbone (e.g.
        BatchNorm statistics). This is what checkpoints hold."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.named_buffers() if not n.startswith("backbone.")}
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise KeyError(f"trainable state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(sd, strict=False)
