"""Video bytes in, frames out: PyAV decoding with seeking, frame-index samplers, encoding. Pure functions, no torch.

A video can also be a sequence of encoded images (JPEG/PNG frames, e.g. Something-Something-v1):
`decode_image_frames` decodes only the images a sampling plan asks for, with the same plans as `decode_frames`.

Samplers:
- segment (TSN, Wang et al., arXiv 1608.00859; the usual SSv2 protocol): T equal segments over the whole video, one
  frame per segment, random inside the segment in training, centred (or evenly offset per view) in testing;
- dense (the K400 protocol of I3D / SlowFast, arXiv 1812.03982): T frames at stride s from a random start in
  training, or from `clips` evenly spaced starts in testing.
Both return int arrays of shape (clips, T) with values in [0, num_frames); videos shorter than needed repeat frames.

Frames are uint8 RGB numpy arrays (..., H, W, 3). `decode_frames` demuxes the packets once (cheap, no decoding) to
learn the frame count and the keyframes, then seeks to the keyframe before each wanted frame instead of decoding a
long video from the start.
"""

from __future__ import annotations

import bisect
import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    """What the packer stores per sample (the `json` member of a shard sample)."""

    fps: float
    frames: int
    duration: float  # seconds
    width: int
    height: int
    codec: str

    def to_dict(self) -> dict:
        return asdict(self)


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise ValueError("empty file")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise ValueError(f"not a readable video container: {e}") from None


def _video_stream(container) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ValueError("no video stream")
    return container.streams.video[0]


def _demux_index(container, stream) -> tuple[list[int] | None, list[int], int]:
    """Returns (sorted packet pts or None if some are missing, sorted keyframe pts, packet count); decodes nothing."""
    pts, keys, count, missing = [], [], 0, False
    try:
        for packet in container.demux(stream):
            if not packet.size:  # the flush packet at the end
                continue
            count += 1
            if packet.pts is None:
                missing = True
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as e:  # a truncated file: keep what was demuxed before the damage
        _logger.debug("demux stopped early: %s", e)
    if count == 0:
        raise ValueError("no video frames")
    return (None if missing else sorted(pts)), sorted(keys), count


def probe(data: bytes) -> VideoInfo:
    """Reads the container header, demuxes every packet and decodes the first frame.

    Args:
        data: The encoded video file.

    Returns:
        fps, frame count (= video packets), duration, size of the decoded first frame, codec name.

    Raises:
        ValueError: With the reason when the bytes are not a decodable video.
    """
    with _open(data) as container:
        stream = _video_stream(container)
        _, _, frames = _demux_index(container, stream)
        rate = stream.average_rate or stream.guessed_rate or 0
        codec = stream.codec_context.name
        duration = float(container.duration / av.time_base) if container.duration else 0.0
    with _open(data) as container:
        try:
            first = next(container.decode(video=0))
        except (av.FFmpegError, StopIteration) as e:
            raise ValueError(f"cannot decode the first frame: {e or 'no frame'}") from None
    fps = float(rate)
    if not duration and fps:
        duration = frames / fps
    return VideoInfo(
        fps=round(fps, 4),
        frames=frames,
        duration=round(duration, 4),
        width=first.width,
        height=first.height,
        codec=codec,
    )


def probe_image(data: bytes, frames: int) -> VideoInfo:
    """The VideoInfo of a frame sequence from its first image (decoded); fps and duration are unknown (0).

    Raises:
        ValueError: When the bytes are not a decodable image.
    """
    image = _decode_image(data)
    codec = {"JPEG": "jpeg", "PNG": "png"}.get(Image.open(io.BytesIO(data)).format, "image")
    return VideoInfo(fps=0.0, frames=frames, duration=0.0, width=image.shape[1], height=image.shape[0], codec=codec)


def decode_image_frames(images: list[bytes], plan: Callable[[int], np.ndarray]) -> np.ndarray:
    """Decodes only the images (one encoded image per frame, in frame order) that a sampling plan asks for.

    Args:
        images: Encoded frames (JPEG or PNG bytes).
        plan: Maps the number of frames n to an int index array of any shape, values in [0, n).

    Returns:
        uint8 array (*plan(n).shape, H, W, 3).

    Raises:
        ValueError: When there are no frames, a sampled image does not decode, or sizes differ.
    """
    if not images:
        raise ValueError("no frames")
    index = np.asarray(plan(len(images)), dtype=np.int64).clip(0, len(images) - 1)
    got = {}
    for i in sorted(set(index.ravel().tolist())):
        try:
            got[i] = _decode_image(images[i])
        except ValueError as e:
            raise ValueError(f"frame {i}: {e}") from None
    if len({a.shape for a in got.values()}) > 1:
        raise ValueError(f"frames of different sizes: {sorted({a.shape for a in got.values()})}")
    first = next(iter(got.values()))
    return np.stack([got[i] for i in index.ravel().tolist()]).reshape(*index.shape, *first.shape)


def _decode_image(data: bytes) -> np.ndarray:
    if not data:
        raise ValueError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad image data
        raise ValueError(f"not a decodable image: {e}") from None


def decode_frames(data: bytes, plan: Callable[[int], np.ndarray], *, threads: int = 1) -> np.ndarray:
    """Decodes only the frames a sampling plan asks for.

    Args:
        data: The encoded video file.
        plan: Maps the number of frames n to an int index array of any shape, values in [0, n).
        threads: FFmpeg decoding threads (1 inside DataLoader workers).

    Returns:
        uint8 array (*plan(n).shape, H, W, 3). A frame lost to a damaged stream is replaced by the nearest decoded one.

    Raises:
        ValueError: When the bytes hold no decodable video frame.
    """
    with _open(data) as container:
        stream = _video_stream(container)
        stream.codec_context.thread_count = threads
        pts, keys, n = _demux_index(container, stream)
        index = np.asarray(plan(n), dtype=np.int64).clip(0, n - 1)
        wanted = sorted(set(index.ravel().tolist()))
        if pts is None or len(pts) != n:
            got = _decode_sequential(container, stream, wanted)
        else:
            got = _decode_seeking(container, stream, pts, keys, wanted)
    if not got:
        raise ValueError("no decodable frame")
    have = sorted(got)
    for i in wanted:  # damaged stream: borrow the nearest decoded frame
        if i not in got:
            got[i] = got[min(have, key=lambda j: abs(j - i))]
    return np.stack([got[i] for i in index.ravel().tolist()]).reshape(*index.shape, *got[have[0]].shape)


def _decode_sequential(container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
    """Decodes from the start; frames are counted in presentation order (for streams without timestamps)."""
    container.seek(0)
    got, want = {}, set(wanted)
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    except av.FFmpegError as e:
        _logger.debug("decode stopped early: %s", e)
    return got


def _decode_seeking(container, stream, pts: list[int], keys: list[int], wanted: list[int]) -> dict[int, np.ndarray]:
    """Decodes runs of frames, seeking to the keyframe before a wanted frame when that skips work."""
    got: dict[int, np.ndarray] = {}
    j = 0
    while j < len(wanted):
        container.seek(pts[wanted[j]], backward=True, any_frame=False, stream=stream)
        start = j
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                while j < len(wanted) and frame.pts >= pts[wanted[j]]:
                    got[wanted[j]] = frame.to_ndarray(format="rgb24")
                    j += 1
                if j == len(wanted):
                    break
                k = bisect.bisect_right(keys, pts[wanted[j]]) - 1  # keyframe at or before the next wanted frame
                if j > start and k >= 0 and keys[k] > frame.pts:
                    break  # seeking there is cheaper than decoding up to it (after a seek that made progress)
        except av.FFmpegError as e:
            _logger.debug("decode stopped early: %s", e)
        if j == start:  # the stream ends (or breaks) before this frame: give up on the rest
            break
    return got


# ----------------------------------------------------------------------------------------------------------------------
# Frame-index samplers


def segment_indices(
    num_frames: int, t: int, *, clips: int = 1, train: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """TSN segment sampling: one frame from each of `t` equal segments.

    Args:
        num_frames: Frames in the video.
        t: Frames per clip.
        clips: Views; view k takes the frame at offset (k + 0.5) / clips inside each segment (test mode).
        train: Random offset per segment (then `clips` must be 1).
        rng: Random generator for training.

    Returns:
        Int array (clips, t).
    """
    edges = np.linspace(0, num_frames, t + 1)
    width = edges[1:] - edges[:-1]  # (t,)
    if train:
        offsets = (rng or np.random.default_rng()).random((clips, t))
    else:
        offsets = np.broadcast_to(((np.arange(clips) + 0.5) / clips)[:, None], (clips, t))
    return np.floor(edges[:-1] + offsets * width).astype(np.int64).clip(0, num_frames - 1)


def dense_indices(
    num_frames: int,
    t: int,
    stride: int,
    *,
    clips: int = 1,
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Dense sampling: `t` frames at `stride` from a random start (train) or `clips` evenly spaced starts (test).

    Args:
        num_frames: Frames in the video.
        t: Frames per clip.
        stride: Step between sampled frames.
        clips: Views in test mode (starts spread uniformly; one view is centred).
        train: Random start.
        rng: Random generator for training.

    Returns:
        Int array (clips, t); positions past the end repeat the last frame.
    """
    slack = max(num_frames - ((t - 1) * stride + 1), 0)
    if train:
        starts = (rng or np.random.default_rng()).integers(0, slack + 1, size=clips)
    elif clips == 1:
        starts = np.array([slack // 2])
    else:
        starts = np.round(np.linspace(0, slack, clips)).astype(np.int64)
    return (starts[:, None] + np.arange(t) * stride).clip(0, num_frames - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Encoding


def encode_video(
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    fmt: str = "mp4",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
) -> bytes:
    """Encodes RGB frames into a video file held in memory.

    Args:
        frames: uint8 (T, H, W, 3).
        fps: Frame rate.
        codec: FFmpeg encoder name (libx264, libvpx-vp9, mpeg4, mjpeg, ...).
        fmt: Container format (mp4, webm, avi, matroska, ...).
        pix_fmt: Encoder pixel format; yuv420p needs even H and W.
        options: Encoder options, e.g. {"crf": "23", "preset": "veryfast"}.

    Returns:
        The file's bytes.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = 1  # keeps x264 output deterministic
        stream.options = dict(options or {})
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def reencode(data: bytes, *, short_side: int, fps: float = 0, crf: int = 23, gop: int = 16) -> bytes:
    """Re-encodes a video to H.264 mp4 with a smaller short side, an optional lower frame rate and short GOPs.

    Short GOPs and x264's `fastdecode` tuning make the seeks of `decode_frames` cheap; videos smaller than
    `short_side` are not upscaled.

    Args:
        data: The encoded source video.
        short_side: Target length of the shorter side (rounded to even).
        fps: Target frame rate; 0 keeps the source rate (frames are dropped, never duplicated).
        crf: x264 constant rate factor.
        gop: Maximum distance between keyframes.

    Returns:
        The mp4 file's bytes.

    Raises:
        ValueError: When the source cannot be decoded.
    """
    info = probe(data)
    scale = min(short_side / min(info.width, info.height), 1.0)
    width, height = (max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2))
    src_fps = info.fps or 25.0
    out_fps = min(fps, src_fps) if fps else src_fps
    step = src_fps / out_fps  # keep source frame i when it is the next multiple of `step`
    buf = io.BytesIO()
    with _open(data) as src, av.open(buf, mode="w", format="mp4") as dst:
        out = dst.add_stream("libx264", rate=Fraction(out_fps).limit_denominator(1001))
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        out.codec_context.thread_count = 1
        out.codec_context.gop_size = gop
        out.options = {"crf": str(crf), "preset": "veryfast", "tune": "fastdecode"}
        time_base = Fraction(1, 1) / out.average_rate
        kept = 0
        try:
            for i, frame in enumerate(src.decode(video=0)):
                if i < round(kept * step):
                    continue
                small = frame.reformat(width=width, height=height, format="yuv420p")
                small.pts, small.time_base = kept, time_base  # renumber frames at the new rate
                dst.mux(out.encode(small))
                kept += 1
        except av.FFmpegError as e:
            if not kept:
                raise ValueError(f"cannot decode: {e}") from None
            _logger.debug("re-encode stopped early: %s", e)
        if not kept:
            raise ValueError("no decodable frame")
        dst.mux(out.encode(None))
    return buf.getvalue()
