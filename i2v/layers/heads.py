"""Classification heads and the retrieval frame projection."""

from __future__ import annotations

import torch
from torch import nn


def linear_head(in_dim: int, num_classes: int, dropout: float = 0.0, std: float | None = None) -> nn.Sequential:
    """Dropout -> Linear. `std` switches the weight to N(0, std) with zero bias (ST-Adapter 0.02, ZeroI2V 0.01);
    None keeps PyTorch's default init (Side4Video)."""
    fc = nn.Linear(in_dim, num_classes)
    if std is not None:
        nn.init.normal_(fc.weight, std=std)
        nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.Dropout(dropout), fc)


class FrameProjection(nn.Module):
    """`ln_post` then `@ proj` of a CLIP vision tower, as trainable copies of its pretrained values: per-frame class
    tokens (B, T, D) -> frame embeddings (B, T, E) in the joint text-video space (retrieval, CLIP4Clip / Side4Video).

    Copies, so that the frozen tower (possibly ZeRO-3 partitioned in its own engine) keeps no trainable parameter."""

    def __init__(self, backbone):
        super().__init__()
        backbone.require_native("the retrieval frame embedding (ln_post, proj)")
        v = backbone.visual
        width, dim = getattr(v.proj, "ds_shape", v.proj.shape)  # a ZeRO-3 partitioned parameter's own shape is (0,)
        self.ln_post = nn.LayerNorm(width, eps=v.ln_post.eps)
        self.proj = nn.Parameter(torch.empty(width, dim))
        from i2v.train.deepspeed import gathered  # full values of a partitioned tower's parameters

        with torch.no_grad(), gathered([v.ln_post.weight, v.ln_post.bias, v.proj]):
            self.ln_post.weight.copy_(v.ln_post.weight)
            self.ln_post.bias.copy_(v.ln_post.bias)
            self.proj.copy_(v.proj)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.ln_post(cls.to(self.proj.dtype)) @ self.proj
