"""Adapters that live inside frozen ViT blocks.

- `STAdapter`: ST-Adapter's depthwise-3D-conv bottleneck (Pan et al., NeurIPS 2022, arXiv 2206.13559).
- `LinearAdapter`: ZeroI2V's activation-free bottleneck, y = x + s * W2 (W1 x + b1) + s * b2, which is an affine map
  and so can be folded into the neighbouring frozen linear layer (Li et al., ECCV 2024, arXiv 2310.01324).
"""

from __future__ import annotations

import torch
from torch import nn

from i2v.layers.temporal import from_video_grid, to_video_grid


class STAdapter(nn.Module):
    """fc1 (D -> d) -> depthwise Conv3d over (kernel_t, 1, 1) -> fc2 (d -> D), added to the patch tokens only.

    As released: no nonlinearity; the conv weight and bias start at zero so the adapter starts as the identity.
    """

    def __init__(self, width: int, bottleneck: int, grid: tuple[int, int], kernel_t: int = 3):
        super().__init__()
        self.grid = grid
        self.fc1 = nn.Linear(width, bottleneck)
        self.conv = nn.Conv3d(
            bottleneck, bottleneck, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0), groups=bottleneck
        )
        self.fc2 = nn.Linear(bottleneck, width)
        for m in (self.conv,):
            nn.init.zeros_(m.weight)
        for m in (self.fc1, self.conv, self.fc2):
            nn.init.zeros_(m.bias)
        # to_video_grid yields channels-last activations, so the conv's weight grad comes out channels-last; a weight
        # in that layout avoids DDP's "grad strides do not match bucket view strides" copy (as in Side4Video).
        self.conv.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """x: (B*T, 1 + L, D), class token first; the class token bypasses the adapter."""
        cls, patches = x[:, :1], x[:, 1:]
        h = to_video_grid(self.fc1(patches), T, self.grid)  # (B, d, T, H, W)
        h = from_video_grid(self.conv(h))  # (B*T, L, d)
        return torch.cat([cls, patches + self.fc2(h)], dim=1)


class LinearAdapter(nn.Module):
    """y = x + s * W2 Dropout(W1 x + b1) + s * b2 with W2, b2 zero-initialised."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(self.drop(self.down(x)))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with adapter(x) = M x + c at inference: M = I + s W2 W1, c = s (W2 b1 + b2)."""
        w1, b1, w2, b2 = self.down.weight, self.down.bias, self.up.weight, self.up.bias
        eye = torch.eye(w1.shape[1], dtype=w1.dtype, device=w1.device)
        return eye + self.scale * w2 @ w1, self.scale * (w2 @ b1 + b2)

    @torch.no_grad()
    def fold_before(self, linear_weight: torch.Tensor, linear_bias: torch.Tensor) -> None:
        """Folds this adapter, applied *before* `y = W x + b`, into W and b in place: W' = W M, b' = W c + b."""
        m, c = self.affine()
        w, b = linear_weight.float(), linear_bias.float()  # fold in fp32 whatever the frozen dtype
        linear_bias.copy_(w @ c.float() + b)
        linear_weight.copy_(w @ m.float())

    @torch.no_grad()
    def fold_after(self, linear_weight: torch.Tensor, linear_bias: torch.Tensor) -> None:
        """Folds this adapter, applied *after* `y = W x + b`, into W and b in place: W' = M W, b' = M b + c."""
        m, c = (t.float() for t in self.affine())
        w, b = linear_weight.float(), linear_bias.float()
        linear_weight.copy_(m @ w)
        linear_bias.copy_(m @ b + c)
