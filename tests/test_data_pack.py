"""i2v.data.pack and `i2v data pack`: shard contents, rejects, resumability, K400 / SSv2 annotation formats."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
from data_fixtures import broken_and_odd_inputs, write_list, write_video

from i2v.cli import main
from i2v.data.pack import pack, read_list
from i2v.data.wds import read_label_map, read_shard_index


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _rejects(out: Path) -> dict[str, str]:
    with (out / "rejects.csv").open() as f:
        return {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}


def test_pack_from_list_writes_shards_labels_index(tmp_path):
    rows = [(f"clips/v{i}.mp4", ["cat", "dog"][i % 2]) for i in range(6)]
    for p, _ in rows:
        write_video(tmp_path / "root" / p, t=10)
    pattern = pack(
        read_list(write_list(tmp_path / "list.csv", rows), tmp_path / "root"),
        tmp_path / "out",
        shard_samples=4,
        progress=False,
        workers=1,
    )
    out = tmp_path / "out"
    assert pattern == str(out / "shard-{000000..000001}.tar")
    assert read_label_map(out) == ["cat", "dog"] and read_label_map(pattern) == ["cat", "dog"]
    assert read_shard_index(pattern) == {str(out / "shard-000000.tar"): 4, str(out / "shard-000001.tar"): 2}
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 6 and index["classes"] == {"cat": 3, "dog": 3} and index["rejected"] == 0
    members = _members(out / "shard-000000.tar")
    assert sorted(members)[:3] == ["0000000_v0.cls", "0000000_v0.json", "0000000_v0.mp4"]
    assert members["0000000_v0.mp4"] == (tmp_path / "root/clips/v0.mp4").read_bytes()  # original bytes
    assert members["0000001_v1.cls"] == b"1"
    meta = json.loads(members["0000001_v1.json"])
    assert meta["label"] == "dog" and meta["path"].endswith("clips/v1.mp4")
    assert (meta["fps"], meta["frames"], meta["duration"], meta["width"], meta["height"]) == (8.0, 10, 1.25, 64, 48)
    assert not list(out.glob(".*tmp*")) and not list((out / ".parts").glob(".*tmp*"))  # temp names renamed away


def test_pack_rejects_broken_inputs_and_keeps_odd_ones(tmp_path):
    good, bad = broken_and_odd_inputs(tmp_path / "in")
    items = [(str(p), "x") for p in [*good.values(), *bad.values()]] + [(str(tmp_path / "nope.mp4"), "x")]
    pack(items, tmp_path / "out", shard_samples=3, progress=False, workers=1)
    rejects = _rejects(tmp_path / "out")
    assert rejects == {
        "empty.mp4": "empty file",
        "random.mp4": rejects["random.mp4"],
        "truncated.mp4": rejects["truncated.mp4"],
        "nope.mp4": "missing file",
    }
    assert "not a readable video container" in rejects["random.mp4"]
    assert json.loads((tmp_path / "out/index.json").read_text())["samples"] == len(good)
    exts = {n.rsplit(".", 1)[1] for t in (tmp_path / "out").glob("*.tar") for n in _members(t)}
    assert {"webm", "avi", "mkv", "mp4"} <= exts  # original containers kept


def test_pack_is_resumable_and_replans_on_change(tmp_path):
    items = [(str(write_video(tmp_path / f"v{i}.mp4", t=4)), "a") for i in range(6)]
    out = tmp_path / "out"
    pack(items, out, shard_samples=2, progress=False, workers=1)
    shards = sorted(out.glob("shard-*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the first run died while writing shard 1
    (out / ".shard-000002.tar.tmp123").write_bytes(b"partial")  # a leftover temp file is ignored
    pack(items, out, shard_samples=2, progress=False, workers=1)
    assert shards[1].exists()
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]  # complete shards are skipped
    assert shards[2].stat().st_mtime_ns == stamps[shards[2].name]
    assert json.loads((out / "index.json").read_text())["samples"] == 6
    pack(items[:5] + [(str(tmp_path / "v0.mp4"), "a")], out, shard_samples=2, progress=False, workers=1)
    assert shards[2].stat().st_mtime_ns != stamps[shards[2].name]  # a changed plan rewrites the affected shard
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]
    pack(items, out, labels=["b", "a"], shard_samples=2, progress=False, workers=1)
    assert shards[0].stat().st_mtime_ns != stamps[shards[0].name]  # so does a new label map
    assert _members(shards[0])["0000000_v0.cls"] == b"1"


def test_pack_parallel_matches_serial_and_reencodes(tmp_path):
    items = [(str(write_video(tmp_path / f"v{i}.mp4", t=6, h=64, w=96)), "a") for i in range(4)]
    pack(items, tmp_path / "serial", shard_samples=1, progress=False, workers=1)
    pack(items, tmp_path / "parallel", shard_samples=1, progress=False, workers=2)
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()
    pack(items, tmp_path / "small", progress=False, workers=1, reencode_to={"short_side": 32, "fps": 4})
    meta = json.loads(_members(tmp_path / "small/shard-000000.tar")["0000000_v0.json"])
    assert (meta["height"], meta["width"], meta["fps"], meta["frames"]) == (32, 48, 4.0, 3)


def test_read_list_formats_and_errors(tmp_path):
    (tmp_path / "a.tsv").write_text("x/1.mp4\tjump\n\n/abs/2.mp4\trun\n")
    assert read_list(tmp_path / "a.tsv", "/r") == [("/r/x/1.mp4", "jump"), ("/abs/2.mp4", "run")]
    (tmp_path / "b.csv").write_text("path,label\n1.mp4,jump\n2.mp4\n")
    with pytest.raises(ValueError, match=r"b\.csv:3: expected 'path,label'"):
        read_list(tmp_path / "b.csv")


def test_cli_pack_videos_folder(tmp_path):
    for label in ("run", "jump"):
        for i in range(2):
            write_video(tmp_path / "videos" / label / f"{i}.mp4", t=4)
    (tmp_path / "videos/run/notes.txt").write_text("not a video")
    assert (
        main(["data", "pack", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    assert read_label_map(tmp_path / "out") == ["jump", "run"]
    assert json.loads((tmp_path / "out/index.json").read_text())["classes"] == {"jump": 2, "run": 2}


def test_cli_pack_kinetics_csv(tmp_path):
    root = tmp_path / "k400/train"
    write_video(root / "abseiling" / "aaa_000010_000020.mp4", t=4)  # per-class folder
    write_video(root / "air_drumming" / "bbb_000000_000010.mp4", t=4)  # folder with underscores
    write_video(root / "ccc_000005_000015.mp4", t=4)  # flat layout
    (tmp_path / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaa,10,20,train\n"
        "air drumming,bbb,0,10,train\n"
        "abseiling,ccc,5,15,train\n"
        "zumba,ddd,1,11,train\n"  # video missing
    )
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "pack",
                "--kinetics-csv",
                str(tmp_path / "train.csv"),
                "--root",
                str(root),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_label_map(out) == ["abseiling", "air drumming", "zumba"]
    assert json.loads((out / "index.json").read_text())["classes"] == {"abseiling": 2, "air drumming": 1, "zumba": 0}
    assert _rejects(out) == {"ddd_000001_000011.mp4": "missing file"}


def test_cli_pack_ssv2_json(tmp_path):
    root = tmp_path / "20bn-something-something-v2"
    for vid in (11, 12, 13):
        write_video(root / f"{vid}.webm", t=4, codec="libvpx-vp9", fmt="webm", options={"crf": "40", "b": "0"})
    (tmp_path / "labels.json").write_text(
        json.dumps({"Pushing something from left to right": "1", "Holding something": "0"})
    )
    entries = [
        {
            "id": "11",
            "label": "pushing a cup from left to right",
            "template": "Pushing [something] from left to right",
            "placeholders": ["a cup"],
        },
        {"id": "12", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]},
        {"id": "13", "label": "holding a box", "template": "Holding [something]", "placeholders": ["a box"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "pack",
                "--ssv2-json",
                str(tmp_path / "train.json"),
                "--ssv2-labels",
                str(tmp_path / "labels.json"),
                "--root",
                str(root),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_label_map(out) == ["Holding something", "Pushing something from left to right"]
    members = _members(out / "shard-000000.tar")
    assert members["0000000_11.cls"] == b"1" and members["0000001_12.cls"] == b"0" and "0000002_13.webm" in members
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "9", "template": "Dropping [something]"}]))
    with pytest.raises(ValueError, match=r"bad\.json: id 9: template 'Dropping something' is not in"):
        main(
            [
                "--verbose",  # the exception itself, not the one-line `i2v: error:` message
                "data",
                "pack",
                "--ssv2-json",
                str(tmp_path / "bad.json"),
                "--ssv2-labels",
                str(tmp_path / "labels.json"),
                "--out",
                str(out),
            ]
        )


def test_cli_pack_list_with_reencode_and_all_rejected(tmp_path, capsys):
    write_video(tmp_path / "root/a.mp4", t=8, h=64, w=96)
    (tmp_path / "root/b.mp4").write_bytes(b"")
    listing = write_list(tmp_path / "list.csv", [("a.mp4", "x"), ("b.mp4", "y")])
    args = ["data", "pack", "--list", str(listing), "--root", str(tmp_path / "root"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out"), "--reencode", "--short-side", "32", "--fps", "4"]) == 0
    assert "1 videos rejected" in capsys.readouterr().out
    meta = json.loads(_members(tmp_path / "out/shard-000000.tar")["0000000_a.json"])
    assert (meta["width"], meta["height"], meta["fps"], meta["frames"]) == (48, 32, 4.0, 4)
    bad = write_list(tmp_path / "bad.csv", [("b.mp4", "y")])
    assert (
        main(["data", "pack", "--list", str(bad), "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o2")]) == 1
    )
