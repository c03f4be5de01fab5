"""i2v.data.synth_captions and `i2v data synth --captions`: captions true to the clips, time-reversed pairs that
differ only in the direction word, determinism, retrieval shards read back through i2v.data.retrieval."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from i2v.cli import main
from i2v.data.retrieval import TASK, captions_of, read_metas
from i2v.data.synth_captions import (
    COLOURS,
    OPPOSITE,
    TEMPLATES,
    captions_for,
    direction_accuracy,
    make_captioned,
    plan_split,
    render_spec,
)
from i2v.data.video import decode_frames


def _centre(clip: np.ndarray) -> np.ndarray:
    """(T, 2) centroid (x, y) of the saturated (object) pixels of each frame; the background is desaturated."""
    c = clip.astype(int)
    mask = (c.max(-1) - c.min(-1)) > 110  # (T, H, W)
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    return np.stack([(xs * m).sum() / m.sum() for m in mask]), np.stack([(ys * m).sum() / m.sum() for m in mask])


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_are_time_reversals_captioned_by_the_direction_word_only(split):
    specs = plan_split(split, 24, seed=7)
    moves = {"right": (1, 0), "left": (-1, 0)}
    for a, b in zip(specs[::2], specs[1::2], strict=True):
        assert (a.colour, a.shape, a.pair) == (b.colour, b.shape, b.pair) and OPPOSITE[a.direction] == b.direction
        clip_a, clip_b = render_spec(a, split, 7), render_spec(b, split, 7)
        assert clip_a.shape == (8, 32, 32, 3) and clip_a.dtype == np.uint8
        np.testing.assert_array_equal(clip_a[::-1], clip_b)  # same frames: an order-invariant model ties them
        for spec, clip in ((a, clip_a), (b, clip_b)):
            x, y = _centre(clip)
            dx, dy = moves[spec.direction]
            assert dx * (x[-1] - x[0]) + dy * (y[-1] - y[0]) > 5  # the object moves the way the caption says
            assert abs(dy * (x[-1] - x[0]) + dx * (y[-1] - y[0])) < 3  # ... and not the other way
            tint = clip[0][(clip[0].max(-1).astype(int) - clip[0].min(-1)) > 110].mean(0)
            assert np.argmax(tint) == np.argmax(COLOURS[spec.colour]) or spec.colour in ("yellow", "magenta", "cyan")
        caps_a, caps_b = captions_for(a, split), captions_for(b, split)
        assert len(caps_a) == (len(TEMPLATES) if split == "train" else 1)
        for ca, cb in zip(caps_a, caps_b, strict=True):
            diff = [(u, v) for u, v in zip(ca.split(), cb.split(), strict=True) if u != v]
            assert diff == [(a.direction, b.direction)]
    if split == "test":  # distinct captions: appearance is needed too (other clips move the same way)
        captions = [captions_for(s, split)[0] for s in specs]
        assert len(set(captions)) == len(captions)
        assert {s.direction for s in specs} == {"left", "right"} and len({s.colour for s in specs}) > 2


def _member_bytes(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_make_captioned_is_deterministic_and_packed_as_retrieval_shards(tmp_path):
    kw = dict(train=6, test=4, frames=6, size=24, shard_samples=4)
    a = make_captioned(tmp_path / "a", seed=3, **kw)
    make_captioned(tmp_path / "b", seed=3, **kw)
    make_captioned(tmp_path / "c", seed=4, **kw)
    assert a.train == str(tmp_path / "a/train/shard-{000000..000001}.tar") and a.test.endswith("test/shard-000000.tar")
    for split, n in (("train", 6), ("test", 4)):  # same seed, same pixels (x264 is not always byte-exact run to run)
        for i, spec in enumerate(plan_split(split, n, 3)):
            rendered = render_spec(spec, split, 3, frames=6, size=24)
            for run in ("a", "b"):
                decoded = decode_frames((tmp_path / run / "videos" / split / f"{i:06d}.mp4").read_bytes(), np.arange)
                assert decoded.shape == rendered.shape and np.abs(decoded - rendered.astype(float)).mean() < 12
    c_clip = render_spec(plan_split("train", 6, 4)[0], "train", 4, frames=6, size=24)
    assert not np.array_equal(render_spec(plan_split("train", 6, 3)[0], "train", 3, frames=6, size=24), c_clip)
    assert [m["captions"] for m in read_metas(str(tmp_path / "a/test"))] != [
        m["captions"] for m in read_metas(str(tmp_path / "c/test"))
    ]
    for split, n, per in (("train", 6, len(TEMPLATES)), ("test", 4, 1)):
        index = json.loads((tmp_path / "a" / split / "index.json").read_text())
        assert (index["task"], index["samples"], index["captions"], index["rejected"]) == (TASK, n, n * per, 0)
        metas = read_metas(str(tmp_path / "a" / split))
        specs = plan_split(split, n, 3)
        assert [m["video_id"] for m in metas] == [f"{split}-{i:06d}" for i in range(n)]  # fixed order
        assert [m["captions"] for m in metas] == [captions_for(s, split) for s in specs]
        assert [m["frames"] for m in metas] == [6] * n and metas[0]["width"] == 24
        assert [m["captions"] for m in metas] == [m["captions"] for m in read_metas(str(tmp_path / "b" / split))]
    # the test pair decodes to exactly the same frames in reverse order (every frame coded on its own)
    shard = _member_bytes(tmp_path / "a/test/shard-000000.tar")
    keys = sorted(k[: -len(".mp4")] for k in shard if k.endswith(".mp4"))
    assert captions_of({"__key__": keys[0], "json": shard[keys[0] + ".json"]}) == captions_for(
        plan_split("test", 4, 3)[0], "test"
    )
    v0, v1, v2 = (decode_frames(shard[k + ".mp4"], lambda n: np.arange(n)) for k in keys[:3])
    np.testing.assert_array_equal(v0[::-1], v1)  # an order-invariant model ties them exactly
    assert np.abs(v0.astype(float) - v1).mean() > 5 and np.abs(v0.mean(0) - v2.mean(0)).mean() > 5
    assert make_captioned(tmp_path / "a", seed=3, **kw) == a  # re-run: reuses videos and shards
    with pytest.raises(ValueError, match="other settings"):
        make_captioned(tmp_path / "a", seed=5, **kw)


def test_cli_synth_captions(tmp_path, capsys):
    out = tmp_path / "synth-captions"
    assert main(["data", "synth", "--captions", "--out", str(out), "--train", "4", "--test", "2", "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"test:  {out / 'test' / 'shard-000000.tar'}" in printed
    assert json.loads((out / "synth.json").read_text())["size"] == 32  # the --captions default
    assert [len(m["captions"]) for m in read_metas(str(out / "train"))] == [len(TEMPLATES)] * 4
    with pytest.raises(ValueError, match="--classes and --val do not apply"):
        main(["--verbose", "data", "synth", "--captions", "--out", str(out), "--val", "3"])


def test_direction_accuracy_reads_a_saved_matrix_in_its_column_order(tmp_path):
    ids = ["test-000002", "test-000000", "test-000003", "test-000001"]  # as gathered from 2 ranks
    sim = np.full((4, 4), 0.1)
    np.fill_diagonal(sim, 0.5)
    sim[0, 2] = 0.9  # test-000002's caption prefers its reversal test-000003
    sim[1, 3] = 0.5  # test-000000's caption ties with test-000001
    np.save(tmp_path / "sim_epoch_001.npy", sim)
    (tmp_path / "sim_video_ids.json").write_text(json.dumps(ids))
    assert direction_accuracy(tmp_path / "sim_epoch_001.npy") == pytest.approx(100 * 2.5 / 4)
    np.save(tmp_path / "sim.npy", np.ones((4, 3)))
    with pytest.raises(ValueError, match="square matrix"):
        direction_accuracy(tmp_path / "sim.npy")
