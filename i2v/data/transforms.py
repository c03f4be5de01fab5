"""Clip-consistent spatial transforms (torchvision transforms v2) and the normalisation constants.

A clip is one uint8 tensor (T, C, H, W). torchvision v2 transforms treat the leading T as a batch dimension and draw
their random parameters once per call, so every frame of a clip gets the same crop, flip and RandAugment ops.
Training: RandomResizedCrop -> optional horizontal flip -> optional RandAugment (Cubuk et al., arXiv 1909.13719) ->
float -> normalise. Testing: resize the short side -> 1 centre crop or 3 crops along the long side (the SlowFast /
ViViT 3-crop protocol) -> float -> normalise, giving (crops, T, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# OpenAI CLIP preprocessing statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)


def train_transform(
    size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    flip: bool = True,
    randaugment: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds the training transform: uint8 (T, C, H, W) -> normalised float32 (T, C, size, size).

    Args:
        size: Output height and width.
        mean: Per-channel mean of the backbone's preprocessing.
        std: Per-channel std of the backbone's preprocessing.
        scale: RandomResizedCrop area range.
        flip: Random horizontal flip; turn off for direction-sensitive labels (SSv2, the synthetic benchmark).
        randaugment: Add RandAugment (default torchvision policy: 2 ops, magnitude 9).
    """
    ops = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment:
        ops.append(v2.RandAugment())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def eval_transform(
    size: int, *, mean: Sequence[float], std: Sequence[float], crops: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds the test transform: uint8 (T, C, H, W) -> normalised float32 (crops, T, C, size, size).

    Args:
        size: Short side after resizing, and crop size.
        mean: Per-channel mean of the backbone's preprocessing.
        std: Per-channel std of the backbone's preprocessing.
        crops: 1 (centre) or 3 (start, centre and end of the long side).
    """
    return v2.Compose(
        [
            v2.Resize(size, antialias=True),  # short side -> size
            MultiCrop(size, crops),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class MultiCrop(torch.nn.Module):
    """1 centre crop, or 3 crops at the start, centre and end of the long side: (T, C, H, W) -> (crops, T, C, s, s)."""

    def __init__(self, size: int, crops: int = 1):
        super().__init__()
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {crops}")
        self.size, self.crops = size, crops

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = clip.shape[-2:]
        if self.crops == 1:
            corners = [((h - s) // 2, (w - s) // 2)]
        elif w >= h:
            corners = [((h - s) // 2, left) for left in (0, (w - s) // 2, w - s)]
        else:
            corners = [(top, (w - s) // 2) for top in (0, (h - s) // 2, h - s)]
        return torch.stack([F.crop(clip, top, left, s, s) for top, left in corners])
