"""Synthetic captioned benchmark for text-video retrieval (`i2v data synth --captions`).

Every clip shows one object of a named colour and shape moving left, right, up or down over the textured noisy
background of `i2v.data.synth`, captioned e.g. "a red square moving left". Clips come in pairs: clip 2k+1 is
clip 2k played backwards (the same rendering, frames reversed before encoding), and its captions are clip 2k's with
the direction word swapped (left <-> right, up <-> down). So:

- retrieving the right clip needs appearance (colour x shape: other clips move the same way) and motion (the
  partner has the same frames);
- any frame-order-invariant video embedding (e.g. CLIP frame features averaged over time) gives the two clips of a
  pair the same embedding (up to H.264 noise), so for every caption it cannot rank the right clip above its
  partner: its text-to-video R@1 is at most 50 %, while an order-aware model can reach 100 %.

Test clips have one caption (the first template) and distinct (colour, shape, direction) combinations as long as
there are at most 2 x 48 = 96 of them; training clips have all templates (paraphrases). Written as retrieval packs
(`i2v.data.retrieval`) in OUT/train and OUT/test (the test order is the clip order), the mp4 files in OUT/videos.
Everything is a function of the seed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np

from i2v.data.pack import pack
from i2v.data.synth import _SHAPES, _render_forward, claim_dir, write_clip

_logger = logging.getLogger(__name__)

COLOURS: Final = {
    "red": (225, 30, 30),
    "green": (30, 195, 45),
    "blue": (40, 70, 240),
    "yellow": (235, 215, 30),
    "magenta": (215, 40, 215),
    "cyan": (40, 210, 225),
}
SHAPES: Final = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "circle": [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)],
    "triangle": _SHAPES["triangle"],
    "arrow": _SHAPES["arrow"],
}
# axis -> (direction of the rendered clip, direction of its time reversal)
AXES: Final = {"horizontal": ("right", "left"), "vertical": ("up", "down")}
OPPOSITE: Final = {"right": "left", "left": "right", "up": "down", "down": "up"}
TEMPLATES: Final = (  # the first is the test caption; training clips get all of them, in this order
    "a {colour} {shape} moving {direction}",
    "a {shape} in {colour} moves {direction}",
    "the {colour} {shape} is going {direction}",
)
SPLITS: Final = ("train", "test")


class ClipSpec(NamedTuple):
    """What clip i of a split shows; `reverse` = it is the time reversal of the rendered (right / up) motion."""

    colour: str
    shape: str
    direction: str
    pair: int
    reverse: bool


def plan_split(split: str, n: int, seed: int) -> list[ClipSpec]:
    """The specs of a split's n clips: pair k = clips 2k and 2k+1, same colour and shape, opposite directions.

    Pairs walk through the 48 (colour, shape, axis) combinations in a seeded order, a fresh order per pass, so a
    split of at most 96 clips never repeats a caption.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    combos = [(c, s, a) for c in COLOURS for s in SHAPES for a in AXES]
    specs, order = [], []
    for i in range(n):
        pair = i // 2
        if pair % len(combos) == 0 and i % 2 == 0:
            order = [combos[j] for j in rng.permutation(len(combos))]
        colour, shape, axis = order[pair % len(combos)]
        reverse = bool(i % 2)
        specs.append(ClipSpec(colour, shape, AXES[axis][int(reverse)], pair, reverse))
    return specs


def captions_for(spec: ClipSpec, split: str) -> list[str]:
    """The clip's captions: every template for training clips, the first for test clips."""
    templates = TEMPLATES if split == "train" else TEMPLATES[:1]
    return [t.format(colour=spec.colour, shape=spec.shape, direction=spec.direction) for t in templates]


def render_spec(spec: ClipSpec, split: str, seed: int, *, frames: int = 8, size: int = 32) -> np.ndarray:
    """uint8 (T, size, size, 3) of a spec; both clips of a pair use the same generator, so they are exact time
    reversals of each other."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 0, spec.pair])
    brightness = rng.uniform(0.8, 1.0)
    colour = np.array(COLOURS[spec.colour], dtype=np.float64) * brightness
    clip = _render_forward("move_right", rng, frames, size, size, shape=SHAPES[spec.shape], colour=colour)
    if spec.direction in ("up", "down"):  # a quarter turn counter-clockwise: rightward motion becomes upward
        clip = np.rot90(clip, k=1, axes=(1, 2))
    return np.ascontiguousarray(clip[::-1] if spec.reverse else clip)


class CaptionShards(NamedTuple):
    """Shard patterns of the two splits."""

    train: str
    test: str


def make_captioned(
    out_dir: str | Path,
    *,
    train: int = 256,
    test: int = 64,
    seed: int = 0,
    frames: int = 8,
    size: int = 32,
    fps: float = 8.0,
    shard_samples: int = 64,
    workers: int = 1,
    progress: bool = False,
) -> CaptionShards:
    """Generates the captioned benchmark: mp4 files under out_dir/videos, retrieval packs in out_dir/{train,test}.

    Re-running with the same settings reuses the videos and the finished shards; other settings in the same
    directory are refused.

    Args:
        out_dir: Output directory.
        train: Training clips (pairs: an even number keeps every pair whole).
        test: Test clips.
        seed: Seed of everything.
        frames: Frames per clip.
        size: Height and width.
        fps: Frame rate written into the files.
        shard_samples: Clips per shard.
        workers: Packing processes (1 = in this process).
        progress: Show progress bars.

    Returns:
        The train and test shard patterns.
    """
    if train < 2 or test < 2:
        raise ValueError(f"need at least one pair of clips per split, got train={train}, test={test}")
    if frames < 2 or size < 16:
        raise ValueError(f"need frames >= 2 and size >= 16, got frames={frames}, size={size}")
    out = Path(out_dir)
    settings = {
        "captions": True,
        "train": train,
        "test": test,
        "seed": seed,
        "frames": frames,
        "size": size,
        "fps": fps,
    }
    claim_dir(out, settings)
    patterns = []
    for split, n in (("train", train), ("test", test)):
        items, captions = [], []
        for i, spec in enumerate(plan_split(split, n, seed)):
            path = out / "videos" / split / f"{i:06d}.mp4"
            if not path.exists():
                write_clip(path, render_spec(spec, split, seed, frames=frames, size=size), fps)
            items.append((str(path), f"{split}-{i:06d}"))
            captions.append(captions_for(spec, split))
        patterns.append(
            pack(items, out / split, captions=captions, shard_samples=shard_samples, workers=workers, progress=progress)
        )
    _logger.info("captioned synthetic benchmark in %s: %d train / %d test clips", out, train, test)
    return CaptionShards(*patterns)
