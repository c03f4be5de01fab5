"""Synthetic temporal benchmark: classes that only the order of frames tells apart (`i2v data synth`).

Classes come in pairs that are exact time reversals of each other: a clip of `move_left` is a clip of `move_right`
played backwards, drawn from the same distribution of shapes, colours, sizes, speeds, positions and noisy textured
backgrounds. Hence the multiset of frames carries no information about the direction of a pair, and any
frame-order-invariant model (e.g. a linear probe on time-averaged frame features) is at chance within each pair:
its accuracy is at most 1/2 however many pairs are used (1/K with K classes is only reachable by an order-aware model).
Use a single pair (e.g. `classes=("move_right", "move_left")`) to put order-invariant models at exactly 1/K.

Clips are real H.264 mp4 files (PyAV), packed into WebDataset shards by `i2v.data.pack.pack`. Everything is a
function of the seed. Defaults (64x64, 16 frames, large objects, clear motion) make the classes learnable by a small
temporal model from 8 frames at 32-64 px in a few CPU minutes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from i2v.data.pack import pack
from i2v.data.video import encode_video
from i2v.files import atomic_write

_logger = logging.getLogger(__name__)

# class -> the class it is rendered as (then played backwards when different)
FORWARD: Final = {
    "move_right": "move_right",
    "move_left": "move_right",
    "rotate_cw": "rotate_cw",
    "rotate_ccw": "rotate_cw",
    "grow": "grow",
    "shrink": "grow",
    "appear": "appear",
    "disappear": "appear",
}
CLASSES: Final = tuple(FORWARD)
REVERSED: Final = {"move_right": "move_left", "rotate_cw": "rotate_ccw", "grow": "shrink", "appear": "disappear"}
REVERSED.update({v: k for k, v in list(REVERSED.items())})

# Unit polygons without rotational or mirror symmetry, so rotation direction is visible.
_SHAPES: Final = {
    "triangle": [(1.0, 0.0), (-0.7, 0.55), (-0.7, -0.3)],
    "arrow": [(1.0, 0.0), (0.2, 0.7), (0.2, 0.3), (-0.9, 0.3), (-0.9, -0.3), (0.2, -0.3), (0.2, -0.5)],
    "ell": [(-0.8, -0.9), (-0.2, -0.9), (-0.2, 0.3), (0.9, 0.3), (0.9, 0.9), (-0.8, 0.9)],
    "half_disc": [(math.cos(a), 0.8 * math.sin(a)) for a in np.linspace(-math.pi / 2, math.pi / 2, 12)] + [(-0.4, 0)],
}


class SynthShards(NamedTuple):
    """Shard patterns of the two splits (plain strings for `DataCfg.train_shards` / `val_shards`)."""

    train: str
    val: str


def render_clip(
    name: str, rng: np.random.Generator, *, frames: int = 16, height: int = 64, width: int = 64
) -> np.ndarray:
    """Draws one clip of class `name`.

    Args:
        name: One of CLASSES.
        rng: Source of every random choice; the same generator state gives the same clip, and the paired class
            (REVERSED[name]) gives exactly the same frames in reverse order.
        frames: T.
        height: H.
        width: W.

    Returns:
        uint8 (T, H, W, 3).
    """
    if name not in FORWARD:
        raise ValueError(f"unknown synthetic class {name!r}; choose from {list(CLASSES)}")
    clip = _render_forward(FORWARD[name], rng, frames, height, width)
    return clip if FORWARD[name] == name else np.ascontiguousarray(clip[::-1])


def _render_forward(
    kind: str,
    rng: np.random.Generator,
    t: int,
    h: int,
    w: int,
    *,
    shape: list[tuple[float, float]] | None = None,
    colour: np.ndarray | None = None,
) -> np.ndarray:
    """One clip of a forward class; `shape` (unit polygon) and `colour` (RGB) replace the random draws when given
    (the captioned benchmark, `i2v.data.synth_captions`)."""
    m = min(h, w)
    background = _background(rng, h, w)  # (H, W, 3) float
    shape = np.array(shape if shape is not None else list(_SHAPES.values())[rng.integers(len(_SHAPES))])  # (K, 2)
    colour = colour if colour is not None else _saturated_colour(rng)  # (3,)
    progress = np.linspace(0.0, 1.0, t) ** rng.uniform(0.7, 1.4)  # uneven speed
    angle = np.full(t, rng.uniform(0, 2 * math.pi))
    radius = np.full(t, rng.uniform(0.18, 0.26) * m)
    alpha = np.ones(t)
    cx = np.full(t, rng.uniform(0.35, 0.65) * w)
    cy = np.full(t, rng.uniform(0.35, 0.65) * h)
    if kind == "move_right":
        distance = rng.uniform(0.35, 0.55) * w
        cx = rng.uniform(0.12 * w, 0.88 * w - distance) + distance * progress
    elif kind == "rotate_cw":  # angle grows; image y points down, so this turns clockwise on screen
        radius[:] = rng.uniform(0.26, 0.32) * m
        angle = angle + rng.uniform(0.5, 0.9) * math.pi * progress
    elif kind == "grow":
        small, big = rng.uniform(0.08, 0.11) * m, rng.uniform(0.26, 0.33) * m
        radius = small + (big - small) * progress
    elif kind == "appear":
        onset = rng.uniform(0.3, 0.7)
        alpha = np.clip((np.linspace(0.0, 1.0, t) - onset) / 0.15 + 0.5, 0.0, 1.0)
    noise = rng.normal(0.0, 6.0, size=(t, h, w, 3))  # per-frame sensor noise
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        rot = np.array([[math.cos(angle[i]), -math.sin(angle[i])], [math.sin(angle[i]), math.cos(angle[i])]])
        pts = shape @ rot.T * radius[i] + (cx[i], cy[i])  # (K, 2) pixel coordinates
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in pts], fill=255)
        a = alpha[i] * np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # (H, W, 1)
        out[i] = np.clip(background * (1 - a) + colour * a + noise[i], 0, 255).astype(np.uint8)
    return out


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation smooth colour field plus fixed fine texture."""
    coarse = rng.uniform(50, 200, size=(4, 4, 3))
    coarse = 0.6 * coarse.mean(-1, keepdims=True) + 0.4 * coarse  # desaturate
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float64)
    return smooth + rng.normal(0.0, 14.0, size=(h, w, 1))


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 6)
    x = 1 - abs(hue % 2 - 1)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(hue) % 6]
    return np.array(rgb) * 255.0 * rng.uniform(0.75, 1.0)


def claim_dir(out: Path, settings: dict) -> None:
    """Records `settings` in out/synth.json; a directory holding synthetic data made with other settings is refused
    (re-runs with the same settings reuse what is there)."""
    marker = out / "synth.json"
    if marker.exists() and json.loads(marker.read_text()) != settings:
        raise ValueError(f"{out}: holds synthetic data made with other settings ({marker}); use another directory")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1))


# Every frame an I-frame at one fixed quantiser: each frame is coded on its own, so a clip played backwards decodes
# to exactly the same frames in reverse order. With inter frames (and crf's look-ahead) the first frame is coded
# sharper than the rest, which tells an order-invariant model where the motion starts.
ENCODING: Final = {"qp": "20", "preset": "veryfast", "x264-params": "keyint=1"}


def write_clip(path: Path, clip: np.ndarray, fps: float) -> None:
    """Encodes a rendered clip as H.264 mp4 (`ENCODING`) at `path` (temp name, then rename: no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, encode_video(clip, fps, options=ENCODING))


def make_synthetic(
    out_dir: str | Path,
    *,
    classes: tuple[str, ...] | list[str] = CLASSES,
    train: int = 400,
    val: int = 100,
    seed: int = 0,
    frames: int = 16,
    size: int = 64,
    fps: float = 8.0,
    shard_samples: int = 64,
    workers: int = 1,
    progress: bool = False,
) -> SynthShards:
    """Generates the benchmark as mp4 files under out_dir/videos and packs them into out_dir/{train,val}.

    Balanced classes (clip i has class i mod K). Re-running with the same settings reuses the videos and the
    finished shards; other settings in the same directory are refused.

    Args:
        out_dir: Output directory.
        classes: Class names from CLASSES; the label map keeps this order.
        train: Training clips.
        val: Validation clips.
        seed: Seed of everything.
        frames: Frames per clip.
        size: Height and width.
        fps: Frame rate written into the files.
        shard_samples: Clips per shard.
        workers: Packing processes (1 = in this process).
        progress: Show progress bars.

    Returns:
        The train and val shard patterns.
    """
    classes = tuple(classes)
    if train < 1 or val < 1:
        raise ValueError(f"need at least one clip per split, got train={train}, val={val}")
    for c in classes:
        if c not in FORWARD:
            raise ValueError(f"unknown synthetic class {c!r}; choose from {list(CLASSES)}")
    out = Path(out_dir)
    settings = {
        "classes": list(classes),
        "train": train,
        "val": val,
        "seed": seed,
        "frames": frames,
        "size": size,
        "fps": fps,
        "encoding": ENCODING,
    }
    claim_dir(out, settings)
    patterns = []
    for split_id, (split, n) in enumerate((("train", train), ("val", val))):
        items = []
        for i in range(n):
            name = classes[i % len(classes)]
            path = out / "videos" / split / f"{i:06d}_{name}.mp4"
            if not path.exists():
                rng = np.random.default_rng([seed, split_id, i])
                write_clip(path, render_clip(name, rng, frames=frames, height=size, width=size), fps)
            items.append((str(path), name))
        patterns.append(
            pack(
                items,
                out / split,
                labels=list(classes),
                shard_samples=shard_samples,
                workers=workers,
                progress=progress,
            )
        )
    _logger.info("synthetic benchmark in %s: %d train / %d val clips, %d classes", out, train, val, len(classes))
    return SynthShards(*patterns)
