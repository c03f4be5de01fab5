"""Synthetic captioned benchmark for text-video retrieval (`i2v data synth --captions`).

Every clip shows one object of a named colour and shape moving left or right over the textured noisy background of
`i2v.data.synth`, captioned e.g. "a red square moving left". Clips come in pairs: clip 2k+1 is clip 2k played
backwards (the same rendering, frames reversed before encoding), and its captions are clip 2k's with the direction
word swapped. So:

- retrieving the right clip needs appearance (colour x shape: other clips move the same way) and motion (the
  partner has the same frames);
- any frame-order-invariant video embedding (e.g. CLIP frame features averaged over time) gives the two clips of a
  pair the same embedding (every frame is coded on its own, `ENCODING`, so the partner decodes to exactly the same
  frames), so for every caption it cannot rank the right clip above its partner: its text-to-video R@1 is at most
  50 %, while an order-aware model can reach 100 %.

Motion is horizontal only. With up and down as well, the smoke run's tiny random-initialised models learned no
direction within the smoke budget. Even Side4Video's classifier, trained on the 4 direction labels of the 256
training clips, took 30 epochs to reach 0.73 (chance 0.25); on left/right alone it reached 1.0 in 9. The point, that
frame order is needed, is the same with two directions.

Test clips have one caption (the first template) and distinct (colour, shape, direction) combinations as long as
there are at most 2 x 24 = 48 of them; training clips have all templates (paraphrases). Written as retrieval packs
(`i2v.data.retrieval`) in OUT/train and OUT/test (the test order is the clip order), the mp4 files in OUT/videos.
Everything is a function of the seed.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np

from i2v.data.pack import pack
from i2v.data.synth import _SHAPES, ENCODING, _render_forward, claim_dir, write_clip

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
DIRECTIONS: Final = ("right", "left")  # of the rendered clip, of its time reversal
OPPOSITE: Final = {"right": "left", "left": "right"}
TEMPLATES: Final = (  # the first is the test caption; training clips get all of them, in this order
    "a {colour} {shape} moving {direction}",
    "a {shape} in {colour} moves {direction}",
    "the {colour} {shape} is going {direction}",
)
SPLITS: Final = ("train", "test")


class ClipSpec(NamedTuple):
    """What clip i of a split shows; `reverse` = it is the time reversal of the rendered (rightward) motion."""

    colour: str
    shape: str
    direction: str
    pair: int
    reverse: bool


def plan_split(split: str, n: int, seed: int) -> list[ClipSpec]:
    """The specs of a split's n clips: pair k = clips 2k and 2k+1, same colour and shape, opposite directions.

    Pairs walk through the 24 (colour, shape) combinations in a seeded order, a fresh order per pass, so a split of
    at most 48 clips never repeats a caption.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    specs, order = [], []
    for i in range(n):
        pair = i // 2
        if pair % len(combos) == 0 and i % 2 == 0:
            order = [combos[j] for j in rng.permutation(len(combos))]
        colour, shape = order[pair % len(combos)]
        reverse = bool(i % 2)
        specs.append(ClipSpec(colour, shape, DIRECTIONS[int(reverse)], pair, reverse))
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
    return np.ascontiguousarray(clip[::-1] if spec.reverse else clip)


def direction_accuracy(sim_path: str | Path) -> float:
    """Percent of the test captions whose own clip outscores its time reversal (ties count 1/2) in a similarity
    matrix saved by `retrieval.save_sim=true` (`sim_epoch_NNN.npy` of `i2v train`, `sim.npy` of `i2v eval`; its
    `sim_video_ids.json` beside it names the columns). An order-invariant video embedding scores 50 (up to float
    rounding).

    The test split's one caption per clip makes the rows follow the columns; its clip 2k+1 is clip 2k reversed.
    """
    path = Path(sim_path)
    sim = np.load(path)
    ids = json.loads((path.parent / "sim_video_ids.json").read_text())
    if sim.shape != (len(ids), len(ids)) or not all(i.startswith("test-") for i in ids):
        raise ValueError(f"{path}: expected the square matrix of a synthetic captioned test split, got {sim.shape}")
    column = {v: j for j, v in enumerate(ids)}
    pairs = np.array([(j, column[p]) for j, v in enumerate(ids) if (p := f"test-{int(v[5:]) ^ 1:06d}") in column])
    own, other = sim[pairs[:, 0], pairs[:, 0]], sim[pairs[:, 0], pairs[:, 1]]
    return float(100 * np.mean((own > other) + 0.5 * (own == other)))


class CaptionShards(NamedTuple):
    """Shard patterns of the two splits."""

    train: str
    test: str


def make_captioned(
    out_dir: str | Path,
    *,
    train: int = 256,
    test: int = 48,
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
        "encoding": ENCODING,
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
