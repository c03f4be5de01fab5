"""Official split files (UCF101, HMDB51), Something-Something-v1 frame folders and frame-sequence samples: packing,
reading through the same sampler as video files, and training on them."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from data_fixtures import read_stamps, stamped_frames, write_video
from PIL import Image

from i2v.cli import main
from i2v.config import DataCfg
from i2v.data.cli import run_stats
from i2v.data.pack import hmdb51_items, pack, scan_folders, ucf101_items
from i2v.data.transforms import CLIP_MEAN, CLIP_STD, normalize
from i2v.data.wds import ClipSpec, build_eval_loader, build_train_loader, read_label_map


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _metas(out: Path) -> dict[str, tuple[str, int]]:
    """video file name -> (label, class index) over all shards of a pack."""
    got = {}
    for shard in sorted(out.glob("shard-*.tar")):
        members = _members(shard)
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                got[Path(meta["path"]).name] = (meta["label"], int(members[name[:-4] + "cls"]))
    return got


def write_frames(folder: Path, t: int = 16, *, fmt: str = "JPEG", tint: int = 0, start: int = 1) -> Path:
    """A frame folder like SSv1's: 00001.jpg, 00002.jpg, ... (stamped with their 0-based index)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(stamped_frames(t, tint=tint)):
        suffix = "jpg" if fmt == "JPEG" else "png"
        Image.fromarray(frame).save(folder / f"{i + start:05d}.{suffix}", format=fmt, quality=95)
    return folder


def pack_cli(*args: str) -> int:
    return main(["--verbose", "data", "pack", *args, "--no-progress", "--workers", "1"])  # errors raise


def test_ucf101_splits_any_n_label_from_the_directory(tmp_path):
    splits, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 YoYo\n")
    videos = {c: [f"v_{c}_g0{g}_c01.avi" for g in range(1, 4)] for c in ("ApplyEyeMakeup", "Archery", "YoYo")}
    for c, names in videos.items():
        for n in names:
            write_video(root / c / n, t=4, codec="mpeg4", fmt="avi")
    # split 2: group 1 is the test set; the trailing id is wrong on purpose (the parser ignores it)
    (splits / "trainlist02.txt").write_text("".join(f"{c}/{n} 3\n" for c, ns in videos.items() for n in ns[1:]))
    (splits / "testlist02.txt").write_text("".join(f"{c}/{ns[0]}\n" for c, ns in videos.items()))
    items, names = ucf101_items(splits, root, 2, "train")
    assert names == ["ApplyEyeMakeup", "Archery", "YoYo"] and len(items) == 6
    assert pack_cli("--ucf101", str(splits), "--split", "2", "--part", "test", "--root", str(root), "--out",
                    str(tmp_path / "test")) == 0  # fmt: skip
    assert _metas(tmp_path / "test") == {
        "v_ApplyEyeMakeup_g01_c01.avi": ("ApplyEyeMakeup", 0),
        "v_Archery_g01_c01.avi": ("Archery", 1),
        "v_YoYo_g01_c01.avi": ("YoYo", 2),
    }
    assert pack_cli("--ucf101", str(splits), "--split", "2", "--part", "train", "--root", str(root), "--out",
                    str(tmp_path / "train")) == 0  # fmt: skip
    index = json.loads((tmp_path / "train/index.json").read_text())
    assert index["classes"] == {"ApplyEyeMakeup": 2, "Archery": 2, "YoYo": 2} and index["rejected"] == 0
    assert {v for v, _ in _metas(tmp_path / "train").values()} == set(videos)
    with pytest.raises(ValueError, match=r"testlist01\.txt: cannot read"):
        ucf101_items(splits, root, 1, "test")
    (splits / "testlist03.txt").write_text("Bowling/v_Bowling_g01_c01.avi\n")
    with pytest.raises(ValueError, match=r"testlist03\.txt:1: expected '<ClassName>/<file>' with a class of classInd"):
        ucf101_items(splits, root, 3, "test")
    with pytest.raises(ValueError, match="need --part"):
        pack_cli("--ucf101", str(splits), "--root", str(root), "--out", str(tmp_path / "x"))


def test_hmdb51_split_flags_one_train_two_test_zero_unused(tmp_path):
    splits, root = tmp_path / "testTrainMulti_7030_splits", tmp_path / "hmdb51"
    splits.mkdir()
    flags = {  # video -> (split 1 flag, split 2 flag)
        "brush_hair": {"a.avi": (1, 2), "b.avi": (2, 1), "c.avi": (0, 1)},
        "cartwheel": {"d.avi": (1, 0), "e.avi": (2, 2)},
    }
    for c, vids in flags.items():
        for split in (1, 2):
            (splits / f"{c}_test_split{split}.txt").write_text(
                "".join(f"{v} {f[split - 1]} \n" for v, f in vids.items())
            )
        for v in vids:
            write_video(root / c / v, t=4, codec="mpeg4", fmt="avi")
    expect = {
        (1, "train"): {"a.avi", "d.avi"},
        (1, "test"): {"b.avi", "e.avi"},
        (2, "train"): {"b.avi", "c.avi"},
        (2, "test"): {"a.avi", "e.avi"},
    }
    for (split, part), want in expect.items():
        items, names = hmdb51_items(splits, root, split, part)
        assert names == ["brush_hair", "cartwheel"] and {Path(p).name for p, _ in items} == want, (split, part)
    out = tmp_path / "out"
    assert (
        pack_cli("--hmdb51", str(splits), "--split", "2", "--part", "train", "--root", str(root), "--out", str(out))
        == 0
    )
    assert _metas(out) == {"b.avi": ("brush_hair", 0), "c.avi": ("brush_hair", 0)}
    assert read_label_map(out) == ["brush_hair", "cartwheel"]  # the empty class keeps its index
    with pytest.raises(ValueError, match=r"no \*_test_split3\.txt files"):
        hmdb51_items(splits, root, 3, "train")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi train\n")
    with pytest.raises(ValueError, match=r"cartwheel_test_split2\.txt:1: expected '<video> <flag 0\|1\|2>'"):
        hmdb51_items(splits, root, 2, "train")


def ssv1(tmp_path: Path, ids=(11, 12, 13, 14), t: int = 16) -> tuple[Path, Path, Path]:
    root = tmp_path / "20bn-something-something-v1"
    names = ["Approaching something with your camera", "Holding something", "Pushing something from left to right"]
    (tmp_path / "labels.csv").write_text("\n".join(names) + "\n")
    for k, vid in enumerate(ids):
        write_frames(root / str(vid), t=t, tint=10 * (k % 3))
    rows = [f"{vid};{names[k % 3]}" for k, vid in enumerate(ids)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.csv", tmp_path / "labels.csv", root


def test_ssv1_frame_folders_pack_as_frame_sequences(tmp_path):
    csv_path, labels, root = ssv1(tmp_path)
    out = tmp_path / "out"
    assert (
        pack_cli("--ssv1-csv", str(csv_path), "--ssv1-labels", str(labels), "--root", str(root), "--out", str(out)) == 0
    )
    assert read_label_map(out)[0] == "Approaching something with your camera"
    members = _members(out / "shard-000000.tar")
    assert [n for n in sorted(members) if n.startswith("0000001_12.")] == [
        *(f"0000001_12.{i:05d}.jpg" for i in range(16)),
        "0000001_12.cls",
        "0000001_12.json",
    ]
    assert members["0000001_12.00003.jpg"] == (root / "12/00004.jpg").read_bytes()  # original bytes, in frame order
    assert members["0000001_12.cls"] == b"1"
    meta = json.loads(members["0000001_12.json"])
    assert (meta["frames"], meta["width"], meta["height"], meta["codec"], meta["fps"]) == (16, 64, 48, "jpeg", 0.0)
    (tmp_path / "test.csv").write_text("11\n")  # the SSv1 test CSV has no labels
    with pytest.raises(ValueError, match=r"test\.csv:1: expected '<id>;<label of labels\.csv>'"):
        pack_cli("--ssv1-csv", str(tmp_path / "test.csv"), "--ssv1-labels", str(labels), "--out", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="re-encoding applies to video files"):
        pack([(str(root / "11"), "x")], tmp_path / "o2", reencode_to={"short_side": 32}, progress=False)


@pytest.mark.parametrize("sampler, clips", [("segment", 3), ("dense", 2)])
def test_frame_sequences_and_video_files_give_the_same_frames(tmp_path, sampler, clips):
    folder = write_frames(tmp_path / "frames", t=20, fmt="PNG")  # lossless: decoded frames are exact
    video = write_video(tmp_path / "v.mp4", t=20)
    sample_frames = {"__key__": "k", "cls": b"0", **{f"{i:05d}.png": p.read_bytes() for i, p in
                                                     enumerate(sorted(folder.iterdir()))}}  # fmt: skip
    sample_video = {"__key__": "k", "cls": b"0", "mp4": video.read_bytes()}
    for train in (False, True):
        spec = ClipSpec(
            8,
            sampler,
            2,
            train=train,
            clips=1 if train else clips,
            transform=(lambda v: v) if train else (lambda v: v[None]),
        )
        a, _ = spec(sample_frames, random.Random(1))
        b, _ = spec(sample_video, random.Random(1))
        got = read_stamps(a.permute(*range(a.dim() - 3), -2, -1, -3).numpy())
        assert np.array_equal(got, read_stamps(b.permute(*range(b.dim() - 3), -2, -1, -3).numpy()))
        assert a.dtype == torch.uint8 and a.shape[-2:] == (48, 64)


def test_generic_frame_folders_corrupt_frames_are_skipped_and_counted(tmp_path):
    for c in ("jump", "run"):
        for v in range(2):
            write_frames(tmp_path / "videos" / c / f"clip{v}", t=4)
    write_video(tmp_path / "videos/run/file.mp4", t=4)  # video files and frame folders mix
    (tmp_path / "videos/jump/clip1/00002.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "videos/jump/empty").mkdir()  # no frames: not a video
    items = scan_folders(tmp_path / "videos")
    assert sorted(Path(p).name for p, _ in items) == ["clip0", "clip0", "clip1", "clip1", "file.mp4"]
    out = tmp_path / "out"
    assert pack_cli("--videos", str(tmp_path / "videos"), "--out", str(out)) == 0
    report = run_stats(str(out), frames=4, size=32, batch_size=2)  # 4 of 4 frames: the broken one is sampled
    assert report["clips"] == 4 and report["skipped"] == 1
    assert "frame 1: not a decodable image" in report["skipped_samples"][0]["reason"]
    assert report["labels"] == {"jump": 1, "run": 3}


def test_ssv1_frames_train_in_the_smoke_setting(tmp_path):
    csv_path, labels, root = ssv1(tmp_path, ids=range(20, 32), t=10)
    out = tmp_path / "out"
    assert pack_cli("--ssv1-csv", str(csv_path), "--ssv1-labels", str(labels), "--root", str(root), "--out", str(out),
                    "--shard-samples", "4") == 0  # fmt: skip
    from i2v.train.loop import Trainer

    cfg = tiny_cfg("side4video", f"data.train_shards={out}", f"data.val_shards={out}", "data.size=32",
                   "data.num_workers=0", "data.batch_size=4", "method.head_dropout=0.0", num_classes=3)  # fmt: skip
    loader = build_train_loader(cfg.data, seed=0)
    assert len(loader) == 3  # 12 clips / batch 4
    t = Trainer(cfg, torch.device("cpu"), rank=0, world=1, steps_per_epoch=len(loader))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    losses = []
    for video, label in loader:
        assert video.shape == (4, 4, 3, 32, 32) and video.dtype == torch.uint8
        [(loss, _)] = t.train_step(normalize(video, CLIP_MEAN, CLIP_STD), label, boundary=True)  # one member
        assert np.isfinite(loss)
        losses.append(loss)
    assert len(losses) == 3 and loader.skipped.count == 0
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters() if n in before)
    views = [
        v for v, _ in build_eval_loader(DataCfg(val_shards=str(out), frames=4, size=32, num_classes=3, test_clips=2))
    ]
    assert sum(len(v) for v in views) == 12 and views[0].shape[1:] == (2, 4, 3, 32, 32)


def test_side4video_rawframes_list_with_id_name_labels(tmp_path):
    root = tmp_path / "frames"
    for vid in ("1", "2", "3"):
        write_frames(root / vid, t=3)
    (tmp_path / "sth_labels.csv").write_text("id,name\n0,Approaching something\n1,Holding something\n")
    (tmp_path / "train_rgb.txt").write_text("1 3 1\n2 3 0\n3 3 1\n")  # <id> <num_frames> <label>
    out = tmp_path / "out"
    args = ["--rawframes", str(tmp_path / "train_rgb.txt"), "--labels", str(tmp_path / "sth_labels.csv")]
    assert pack_cli(*args, "--root", str(root), "--out", str(out)) == 0
    assert read_label_map(out) == ["Approaching something", "Holding something"]
    assert _metas(out) == {
        "1": ("Holding something", 1),
        "2": ("Approaching something", 0),
        "3": ("Holding something", 1),
    }
    (tmp_path / "bad.txt").write_text("1 3 2\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: label 2 is past the 2 class names"):
        pack_cli(
            "--rawframes", str(tmp_path / "bad.txt"), "--labels", str(tmp_path / "sth_labels.csv"), "--out", str(out)
        )
