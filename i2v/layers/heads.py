"""Classification heads."""

from __future__ import annotations

from torch import nn


def linear_head(in_dim: int, num_classes: int, dropout: float = 0.0, std: float | None = None) -> nn.Sequential:
    """Dropout -> Linear. `std` switches the weight to N(0, std) with zero bias (ST-Adapter 0.02, ZeroI2V 0.01);
    None keeps PyTorch's default init (Side4Video)."""
    fc = nn.Linear(in_dim, num_classes)
    if std is not None:
        nn.init.normal_(fc.weight, std=std)
        nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.Dropout(dropout), fc)
