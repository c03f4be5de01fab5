"""Clip-consistent spatial transforms (torchvision transforms v2) and the normalisation constants.

A clip is one uint8 tensor (T, C, H, W). torchvision v2 transforms treat the leading T as a batch dimension and draw
their random parameters once per call, so every frame of a clip gets the same crop, flip and RandAugment ops.
Training: RandomResizedCrop -> optional horizontal flip -> optional RandAugment (Cubuk et al., arXiv 1909.13719).
Testing: resize the short side -> 1 centre crop or 3 crops along the long side (the SlowFast / ViViT 3-crop
protocol), giving (crops, T, C, H, W). Both stay uint8: loader workers ship uint8 clips (a quarter of float32's bytes
to pin and copy), and `normalize` turns them into the backbone's float input on the device, after the copy.
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


def normalize(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The backbone's input from uint8 clips, on the clips' device: float32 (video / 255 - mean) / std.

    The last step of both transforms, run after the host-to-device copy. Channels are dimension -3, so any leading
    dimensions work: (B, T, C, H, W) or (B, V, T, C, H, W).

    Raises:
        TypeError: When `video` is not uint8 (e.g. already normalised).
    """
    if video.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 clips as the loaders yield them, got {video.dtype}")
    return F.normalize(F.to_dtype(video, torch.float32, scale=True), list(mean), list(std))


def train_transform(
    size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    flip: bool = True,
    randaugment: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds the training transform: uint8 (T, C, H, W) -> uint8 (T, C, size, size); `normalize` comes later.

    Args:
        size: Output height and width.
        scale: RandomResizedCrop area range.
        flip: Random horizontal flip; turn off for direction-sensitive labels (SSv2, the synthetic benchmark).
        randaugment: Add RandAugment (default torchvision policy: 2 ops, magnitude 9).
    """
    ops = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment:
        ops.append(v2.RandAugment())
    return v2.Compose(ops)


def eval_transform(size: int, *, crops: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds the test transform: uint8 (T, C, H, W) -> uint8 (crops, T, C, size, size); `normalize` comes later.

    Args:
        size: Short side after resizing, and crop size.
        crops: 1 (centre) or 3 (start, centre and end of the long side).
    """
    return v2.Compose([v2.Resize(size, antialias=True), MultiCrop(size, crops)])  # Resize: short side -> size


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
