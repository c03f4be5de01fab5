"""Clip-consistent spatial transforms (torchvision transforms v2, timm RandAugment) and the normalisation constants.

A clip is one uint8 tensor (T, C, H, W). torchvision v2 transforms treat the leading T as a batch dimension and draw
their random parameters once per call, so every frame of a clip gets the same resize, crop, flip, grayscale and
erasing box; `ClipRandAugment` replays one timm RandAugment draw on every frame.
Training (`train_transform`): the reference recipes' ops in their order (RandAugment position, pre-resize, RRC or
short-side jitter, flip reported for label swaps, grayscale, RandomErasing). Testing (`eval_transform`): resize (short
side or height x width) -> 1 centre crop or 3 crops (along the long side, or Side4Video's full-resolution offsets),
giving (crops, T, C, H, W). Both stay uint8: loader workers ship uint8 clips (a quarter of float32's bytes to pin and
copy), and `normalize` turns them into the backbone's float input on the device, after the copy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# OpenAI CLIP preprocessing statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)

RANDAUGMENT_AT: Final = ("before_resize", "before_crop", "after_flip")
_INTERP: Final = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


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
    randaugment: str | None = None,
    randaugment_at: str = "before_crop",
    resize: Sequence[int] | None = None,
    short_side_jitter: Sequence[int] | None = None,
    grayscale_p: float = 0.0,
    random_erasing: float = 0.0,
    random_erasing_mode: str = "const",
    resize_interpolation: str = "bilinear",
    crop_interpolation: str = "bilinear",
) -> TrainTransform:
    """Builds the training transform: uint8 (T, C, H, W) -> uint8 (T, C, size, size); `normalize` comes later.

    Order: [RandAugment `before_resize`] -> [pre-resize] -> [RandAugment `before_crop`] -> crop -> [flip] ->
    [RandAugment `after_flip`] -> [grayscale] -> [RandomErasing]. Every op draws its random parameters once per clip.

    Args:
        size: Output height and width.
        scale: RandomResizedCrop area range (aspect 3/4 to 4/3).
        flip: Random horizontal flip (p 0.5); `TrainTransform.with_flip` reports it so labels can be swapped.
        randaugment: timm RandAugment policy string, e.g. "rand-m7-n4-mstd0.5-inc1"; None = off.
        randaugment_at: "before_resize" (on the stored frames), "before_crop" (after the pre-resize) or "after_flip".
        resize: Pre-resize before the crop: [short_side] keeps the aspect, [height, width] sets both; None = off.
        short_side_jitter: [lo, hi]: short side to a random integer in [lo, hi], then a random `size` crop (replaces
            the RandomResizedCrop; ST-Adapter K400). None = RandomResizedCrop.
        grayscale_p: Probability of turning the whole clip grayscale (3 channels kept).
        random_erasing: Probability of erasing one box (area 0.02-1/3, aspect 0.3-3.33), the same on every frame.
        random_erasing_mode: "const" (fill 128) or "rand" (uniform random pixels, one patch for every frame).
        resize_interpolation: Interpolation of the pre-resize and the jitter resize ("bilinear" or "bicubic").
        crop_interpolation: Interpolation of the RandomResizedCrop.
    """
    if randaugment_at not in RANDAUGMENT_AT:
        raise ValueError(f"randaugment_at: {randaugment_at!r} is not one of {RANDAUGMENT_AT}")
    ra = ClipRandAugment(randaugment) if randaugment else None
    before: list = []
    if ra and randaugment_at == "before_resize":
        before.append(ra)
    if resize:
        before.append(v2.Resize(list(resize) if len(resize) == 2 else resize[0], _INTERP[resize_interpolation]))
    if ra and randaugment_at == "before_crop":
        before.append(ra)
    if short_side_jitter:
        lo, hi = short_side_jitter
        before += [v2.RandomShortestSize(list(range(lo, hi + 1)), interpolation=_INTERP[resize_interpolation])]
        before.append(v2.RandomCrop(size))
    else:
        before.append(v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=_INTERP[crop_interpolation]))
    after: list = []
    if ra and randaugment_at == "after_flip":
        after.append(ra)
    if grayscale_p:
        after.append(v2.RandomGrayscale(grayscale_p))
    if random_erasing:
        box = {"p": random_erasing, "scale": (0.02, 1 / 3), "ratio": (0.3, 1 / 0.3)}
        after.append(
            UniformErasing(**box, value="random")
            if random_erasing_mode == "rand"
            else v2.RandomErasing(**box, value=128)
        )
    return TrainTransform(v2.Compose(before), 0.5 if flip else 0.0, v2.Compose(after or [v2.Identity()]))


class TrainTransform:
    """The training transform: ops before the flip, the flip, ops after it. Call it for the clip, or `with_flip`
    for (clip, flipped), which the loader uses to swap direction-sensitive labels."""

    def __init__(self, before: Callable, flip_p: float, after: Callable):
        self.before, self.flip_p, self.after = before, flip_p, after

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        return self.with_flip(clip)[0]

    def with_flip(self, clip: torch.Tensor) -> tuple[torch.Tensor, bool]:
        clip = self.before(clip)
        flipped = bool(self.flip_p) and bool(torch.rand(1) < self.flip_p)  # one draw, as v2.RandomHorizontalFlip
        if flipped:
            clip = F.horizontal_flip(clip)
        return self.after(clip), flipped


class ClipRandAugment(torch.nn.Module):
    """timm's RandAugment (`rand_augment_transform`, PIL ops, bicubic, fill 128) with one draw per clip.

    timm draws ops, probabilities and magnitudes from Python's and NumPy's global RNGs on every call; both are seeded
    with the same value (from torch's RNG) before each frame, so every frame gets the same ops at the same magnitudes,
    and restored afterwards.
    """

    def __init__(self, policy: str):
        super().__init__()
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_pct": 0.45, "img_mean": (128, 128, 128), "interpolation": Image.BICUBIC}
        try:
            self.op = rand_augment_transform(policy, hparams)
        except (AssertionError, ValueError, KeyError) as e:
            raise ValueError(
                f"randaugment: {policy!r} is not a timm RandAugment policy such as 'rand-m7-n4-mstd0.5-inc1' ({e})"
            ) from None
        self.policy = policy

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**31, (1,)))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            out = []
            for frame in clip:
                random.seed(seed)
                np.random.seed(seed)
                out.append(F.pil_to_tensor(self.op(F.to_pil_image(frame))))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.stack(out)

    def extra_repr(self) -> str:
        return self.policy


class UniformErasing(v2.RandomErasing):
    """torchvision's RandomErasing box, filled with uniform random uint8 pixels (mmaction's mode "rand"); the patch
    is drawn once, so every frame of the clip gets the same box and the same pixels."""

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        if params["v"] is not None:
            params["v"] = torch.randint(0, 256, params["v"].shape, dtype=torch.uint8)  # (C, h, w), as drawn
        return params


def eval_transform(
    size: int,
    *,
    crops: int = 1,
    resize: Sequence[int] | None = None,
    offsets: str = "long_side",
    interpolation: str = "bilinear",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds the test transform: uint8 (T, C, H, W) -> uint8 (crops, T, C, size, size); `normalize` comes later.

    Args:
        size: Crop size (and the resized short side when `resize` is None).
        crops: 1 (centre) or 3.
        resize: [short_side] or [height, width] before cropping; None = short side `size`.
        offsets: Where 3 crops go: "long_side" (start, centre, end of the long side; SlowFast / mmaction ThreeCrop) or
            "full_res" (Side4Video's GroupFullResSample: x = 0, 4s, 2s with s = (W - size) // 4 along the width,
            y = 2 * ((H - size) // 4)).
        interpolation: "bilinear" or "bicubic".
    """
    resize = list(resize) if resize else [size]
    target = resize if len(resize) == 2 else resize[0]  # one int: short side -> it
    return v2.Compose([v2.Resize(target, _INTERP[interpolation], antialias=True), MultiCrop(size, crops, offsets)])


class MultiCrop(torch.nn.Module):
    """1 centre crop, or 3 crops placed per `offsets` (see `eval_transform`): (T, C, H, W) -> (crops, T, C, s, s)."""

    def __init__(self, size: int, crops: int = 1, offsets: str = "long_side"):
        super().__init__()
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {crops}")
        if offsets not in ("long_side", "full_res"):
            raise ValueError(f"offsets must be 'long_side' or 'full_res', got {offsets!r}")
        self.size, self.crops, self.offsets = size, crops, offsets

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = clip.shape[-2:]
        if self.crops == 1:
            corners = [((h - s) // 2, (w - s) // 2)]
        elif self.offsets == "full_res":
            step_h, step_w = (h - s) // 4, (w - s) // 4
            corners = [(2 * step_h, left) for left in (0, 4 * step_w, 2 * step_w)]
        elif w >= h:
            corners = [((h - s) // 2, left) for left in (0, (w - s) // 2, w - s)]
        else:
            corners = [(top, (w - s) // 2) for top in (0, (h - s) // 2, h - s)]
        return torch.stack([F.crop(clip, top, left, s, s) for top, left in corners])
