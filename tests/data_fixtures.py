"""Small video fixtures for the data tests: frames that carry their own index, broken files, packed shards."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import av
import numpy as np

from i2v.data.pack import pack
from i2v.data.video import encode_video

BITS = 7  # frame index stamped as 7 black/white 8x8 blocks in the top-left corner: up to 128 frames


def stamped_frames(t: int, h: int = 48, w: int = 64, *, tint: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) whose frame i shows the binary code of i; `tint` shifts the grey background."""
    frames = np.full((t, h, w, 3), 100 + tint, dtype=np.uint8)
    for i in range(t):
        for b in range(BITS):
            frames[i, :8, b * 8 : (b + 1) * 8] = 255 * ((i >> b) & 1)
    return frames


def read_stamps(frames: np.ndarray) -> np.ndarray:
    """Frame indices read back from stamped frames (..., H, W, 3) -> (...)."""
    blocks = frames[..., :8, : 8 * BITS, :].astype(np.float64)
    blocks = blocks.reshape(*frames.shape[:-3], 8, BITS, 8, 3).mean(axis=(-4, -2, -1))  # (..., BITS)
    return ((blocks > 128) * (1 << np.arange(BITS))).sum(-1)


def write_video(
    path: Path,
    t: int = 16,
    h: int = 48,
    w: int = 64,
    *,
    codec: str = "libx264",
    fmt: str = "mp4",
    pix_fmt: str = "yuv420p",
    fps: float = 8,
    options: dict | None = None,
    tint: int = 0,
) -> Path:
    opts = options if options is not None else ({"crf": "18"} if codec in ("libx264", "libvpx-vp9") else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        encode_video(stamped_frames(t, h, w, tint=tint), fps, codec=codec, fmt=fmt, pix_fmt=pix_fmt, options=opts)
    )
    return path


def truncated_faststart(path: Path, t: int = 24, keep: float = 0.6) -> Path:
    """An mp4 with its index (moov) up front, cut short: the first frames stay decodable, the rest are lost."""
    frames = stamped_frames(t)
    frames[:, 8:] = np.random.default_rng(0).integers(0, 256, frames[:, 8:].shape)  # incompressible: a big mdat
    full = path.with_name("full_" + path.name)
    with av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"crf": "18"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def broken_and_odd_inputs(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Writes the acceptance list of awkward inputs; returns (readable: name -> path, unreadable: name -> path)."""
    good = {
        "three_frames": write_video(root / "three_frames.mp4", t=3),
        "odd_resolution": write_video(root / "odd.mp4", h=47, w=63, pix_fmt="yuv444p"),
        "portrait": write_video(root / "portrait.mp4", h=64, w=56),
        "vp9_webm": write_video(root / "vp9.webm", codec="libvpx-vp9", fmt="webm", options={"crf": "30", "b": "0"}),
        "mpeg4_avi": write_video(root / "mpeg4.avi", codec="mpeg4", fmt="avi"),
        "mjpeg": write_video(root / "mjpeg.mkv", codec="mjpeg", fmt="matroska", pix_fmt="yuvj420p"),
        "truncated_faststart": truncated_faststart(root / "truncated_faststart.mp4"),
    }
    # "truncated": moov atom at the end (the mp4 default) is lost, so nothing can be read
    bad = {"empty": root / "empty.mp4", "random_bytes": root / "random.mp4", "truncated": root / "truncated.mp4"}
    bad["empty"].write_bytes(b"")
    bad["random_bytes"].write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    whole = write_video(root / "whole.mp4", t=24).read_bytes()
    bad["truncated"].write_bytes(whole[: len(whole) // 2])
    (root / "whole.mp4").unlink()
    return good, bad


def write_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return path


def packed_stamps(root: Path, n: int, *, classes: int = 3, shard_samples: int = 5, t: int = 16) -> str:
    """Packs n stamped videos (class i % classes, background tint = 10 * class) and returns the shard pattern."""
    items = [
        (str(write_video(root / "videos" / f"v{i:03d}.mp4", t=t, tint=10 * (i % classes))), f"class{i % classes}")
        for i in range(n)
    ]
    return pack(items, root / "shards", shard_samples=shard_samples, workers=1, progress=False)


def write_tar(path: Path, members: list[tuple[str, bytes]], *, truncate_to: int | None = None) -> Path:
    """A hand-made shard (for corrupt-sample tests); `truncate_to` cuts the finished tar to that many bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:truncate_to] if truncate_to else data)
    return path
