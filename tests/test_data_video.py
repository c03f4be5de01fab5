"""i2v.data.video: frame-index samplers, PyAV decoding with seeks, probing and re-encoding."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import broken_and_odd_inputs, read_stamps, stamped_frames, truncated_faststart, write_video

from i2v.data import video
from i2v.data.video import decode_frames, dense_indices, encode_video, probe, reencode, segment_indices


def test_segment_indices_train_one_frame_per_segment():
    rng = np.random.default_rng(0)
    draws = np.stack([segment_indices(80, 8, train=True, rng=rng)[0] for _ in range(200)])  # (200, 8)
    seg = np.arange(8)
    assert ((draws >= seg * 10) & (draws < seg * 10 + 10)).all()
    assert len(np.unique(draws[:, 0])) == 10  # every frame of a segment gets drawn


def test_segment_indices_test_centre_and_views():
    np.testing.assert_array_equal(segment_indices(80, 8), [[5, 15, 25, 35, 45, 55, 65, 75]])
    views = segment_indices(80, 4, clips=2)  # offsets 1/4 and 3/4 inside each 20-frame segment
    np.testing.assert_array_equal(views, [[5, 25, 45, 65], [15, 35, 55, 75]])


def test_dense_indices_stride_and_starts():
    rng = np.random.default_rng(0)
    starts = {int(dense_indices(100, 8, 4, train=True, rng=rng)[0, 0]) for _ in range(300)}
    assert min(starts) == 0 and max(starts) == 100 - 29  # span (8-1)*4+1 = 29
    np.testing.assert_array_equal(np.diff(dense_indices(100, 8, 4)[0]), 4)
    assert dense_indices(100, 8, 4)[0, 0] == 71 // 2  # centred
    views = dense_indices(100, 8, 4, clips=3)
    np.testing.assert_array_equal(views[:, 0], [0, 36, 71])  # uniform starts over the slack


@pytest.mark.parametrize("sampler", ["segment", "dense"])
def test_short_video_is_padded_by_repeating_frames(sampler):
    idx = segment_indices(3, 8) if sampler == "segment" else dense_indices(3, 8, 4, train=True)
    assert idx.shape == (1, 8) and idx.min() >= 0 and idx.max() == 2
    assert (np.diff(idx[0]) >= 0).all()  # still in temporal order


@pytest.mark.parametrize(
    "codec,fmt,pix_fmt,options",
    [
        ("libx264", "mp4", "yuv420p", {"crf": "18"}),  # default 250-frame GOP with B-frames
        ("libx264", "mp4", "yuv420p", {"crf": "18", "g": "8"}),
        ("libvpx-vp9", "webm", "yuv420p", {"crf": "30", "b": "0"}),
        ("mpeg4", "avi", "yuv420p", {}),
        ("mjpeg", "matroska", "yuvj420p", {}),
    ],
)
def test_decode_frames_returns_exactly_the_planned_frames(tmp_path, codec, fmt, pix_fmt, options):
    data = write_video(
        tmp_path / f"v.{fmt}", t=100, codec=codec, fmt=fmt, pix_fmt=pix_fmt, options=options
    ).read_bytes()
    plan = np.array([[97, 3, 3, 50], [0, 99, 64, 65]])  # unsorted, repeated, far apart
    frames = decode_frames(data, lambda n: plan)
    assert frames.shape == (2, 4, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(read_stamps(frames), plan)


def test_decode_frames_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
    data = write_video(tmp_path / "long.mp4", t=120, options={"crf": "18", "g": "10"}).read_bytes()
    decoded = []
    real_open = video.av.open

    class CountingContainer:  # wraps the real container, counts decoded frames
        def __init__(self, *a, **k):
            self._c = real_open(*a, **k)

        def __getattr__(self, name):
            return getattr(self._c, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._c.close()

        def decode(self, *a, **k):
            for f in self._c.decode(*a, **k):
                decoded.append(f.pts)
                yield f

    monkeypatch.setattr(video.av, "open", CountingContainer)
    frames = decode_frames(data, lambda n: np.array([115, 116]))
    np.testing.assert_array_equal(read_stamps(frames), [115, 116])
    assert len(decoded) <= 12  # from the keyframe at 110, not from frame 0


def test_decode_frames_damaged_stream_borrows_nearest_frame(tmp_path):
    data = truncated_faststart(tmp_path / "cut.mp4", t=24, keep=0.6).read_bytes()
    n = probe(data).frames
    frames = decode_frames(data, lambda n: np.arange(n))
    stamps = read_stamps(frames)
    assert 0 < n < 24 and stamps[0] == 0 and (np.diff(stamps) >= 0).all()


def test_probe_reports_metadata_and_rejects_garbage(tmp_path):
    good, bad = broken_and_odd_inputs(tmp_path)
    info = probe(good["portrait"].read_bytes())
    assert (info.width, info.height, info.frames, info.fps, info.duration, info.codec) == (56, 64, 16, 8.0, 2.0, "h264")
    assert probe(good["odd_resolution"].read_bytes()).width == 63
    assert probe(good["three_frames"].read_bytes()).frames == 3
    for name, path in bad.items():
        with pytest.raises(ValueError) as e:
            probe(path.read_bytes())
        assert str(e.value), name
    with pytest.raises(ValueError, match="empty file"):
        decode_frames(b"", lambda n: np.arange(n))


def test_reencode_short_side_fps_and_content(tmp_path):
    src = encode_video(stamped_frames(32, 96, 128), 16, options={"crf": "18"})
    out = reencode(src, short_side=64, fps=8)
    info = probe(out)
    assert (info.width, info.height, info.fps, info.frames, info.codec) == (86, 64, 8.0, 16, "h264")
    same_size = reencode(src, short_side=96, fps=8)
    frames = decode_frames(same_size, lambda n: np.arange(n))
    np.testing.assert_array_equal(read_stamps(frames), np.arange(0, 32, 2))  # every other source frame
    assert probe(reencode(src, short_side=512)).height == 96  # never upscaled
