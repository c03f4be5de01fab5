"""Tensor plumbing between token sequences and video grids, and the channel-wise temporal shift used by STDHA."""

from __future__ import annotations

import torch


def to_video_grid(x: torch.Tensor, T: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B*T, H*W, C) patch tokens -> (B, C, T, H, W) for 3D convs / BatchNorm3d."""
    return x.unflatten(0, (-1, T)).unflatten(2, grid).permute(0, 4, 1, 2, 3)


def from_video_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, H*W, C)."""
    return x.permute(0, 2, 3, 4, 1).flatten(2, 3).flatten(0, 1)


def temporal_shift(x: torch.Tensor, T: int, offsets: list[int], group: int) -> torch.Tensor:
    """Channel-group-wise temporal shift: group g of frame t takes the values of frame t + offsets[g].

    Frames whose source t + offset falls outside the clip keep their own values (ZeroI2V clones, it does not
    zero-pad). Groups past `len(offsets)` are untouched.

    Args:
        x: (B*T, N, C) tokens.
        T: frames per clip.
        offsets: temporal offset per channel group (a group = one attention head for STDHA).
        group: channels per group.
    """
    v = x.unflatten(0, (-1, T))  # (B, T, N, C)
    out = v.clone()
    for g, d in enumerate(offsets):
        if d == 0 or abs(d) >= T:
            continue
        ch = slice(g * group, (g + 1) * group)
        lo, hi = max(0, -d), min(T, T - d)  # frames t whose source t + d exists
        out[:, lo:hi, :, ch] = v[:, lo + d : hi + d, :, ch]
    return out.flatten(0, 1)
