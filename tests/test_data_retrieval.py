"""Retrieval packs: MSR-VTT / MSVD / VATEX annotation files in their official formats -> shards with every caption
as text, official order, no class labels, rejects for videos without media; the caption reader helpers."""

from __future__ import annotations

import csv
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from data_fixtures import write_video
from PIL import Image

from i2v.cli import main
from i2v.data.pack import pack
from i2v.data.retrieval import CAPTIONS, TASK, VIDEO_ID, captions_of, load_caption_dict, read_metas, video_id_of


def pack_cli(*args: str) -> int:
    return main(["--verbose", "data", "pack", *args, "--no-progress", "--workers", "1"])  # errors raise


def shard_samples(out: Path) -> list[dict[str, bytes]]:
    """Members of every sample (suffix -> bytes) over the pack's shards in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(m).read()
    return list(samples.values())


def rejects(out: Path) -> list[dict]:
    with (out / "rejects.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def videos(root: Path, *ids: str, suffix: str = ".mp4") -> Path:
    for i, vid in enumerate(ids):
        write_video(root / f"{vid}{suffix}", t=4, h=32, w=32, tint=10 * i)
    return root


def check_retrieval_pack(out: Path, ids: list[str], captions: list[list[str]]) -> list[dict]:
    """Asserts the agreed format: video + json members, no cls, no labels.json, index task/captions; returns metas."""
    samples = shard_samples(out)
    assert [video_id_of(s) for s in samples] == ids
    assert [captions_of(s) for s in samples] == captions
    for s in samples:
        assert "cls" not in s and "mp4" in s, s.keys()
        meta = json.loads(s["json"])
        assert meta["frames"] == 4 and meta["path"].endswith(f"{meta[VIDEO_ID]}.mp4") and "label" not in meta
    assert not (out / "labels.json").exists()
    index = json.loads((out / "index.json").read_text())
    assert index["task"] == TASK and "classes" not in index
    assert index["samples"] == len(ids) and index["captions"] == sum(map(len, captions))
    metas = read_metas(str(out))
    assert [m[VIDEO_ID] for m in metas] == ids and [m[CAPTIONS] for m in metas] == captions
    return metas


def test_msrvtt_train_gets_every_sentence_test_its_one_jsfusion_sentence(tmp_path):
    root = videos(tmp_path / "videos", "video0", "video1", "video2", "video7")
    sentences = [  # interleaved, as in MSRVTT_data.json
        ("video2", "a man sings"),
        ("video0", "a cat jumps"),
        ("video2", "someone is singing on stage"),
        ("video9", "no such video in the lists"),
        ("video0", "a kitten leaps onto a sofa"),
        ("video2", "a singer performs"),
        ("video5", "listed but without media"),
        ("video1", "a car drives"),
    ]
    data = {
        "info": {},
        "videos": [{"video_id": v, "url": "", "split": "train"} for v in ("video0", "video1", "video2")],
        "sentences": [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo2\nvideo5\nvideo0\n")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7,video7,a woman is cooking pasta\nret1,msr1,video1,a red car drives\n"
    )
    train, test = tmp_path / "train", tmp_path / "test"
    common = ["--root", str(root), "--shard-samples", "1"]
    pack_cli(
        "--msrvtt",
        str(tmp_path / "MSRVTT_train.9k.csv"),
        "--captions",
        str(tmp_path / "MSRVTT_data.json"),
        "--out",
        str(train),
        *common,
    )
    check_retrieval_pack(
        train,
        ["video2", "video0"],
        [
            ["a man sings", "someone is singing on stage", "a singer performs"],
            ["a cat jumps", "a kitten leaps onto a sofa"],
        ],
    )
    assert [(Path(r["path"]).name, r["reason"]) for r in rejects(train)] == [("video5.mp4", "missing file")]
    pack_cli("--msrvtt", str(tmp_path / "MSRVTT_JSFUSION_test.csv"), "--out", str(test), *common)
    check_retrieval_pack(test, ["video7", "video1"], [["a woman is cooking pasta"], ["a red car drives"]])
    assert rejects(test) == []
    # a train list without MSRVTT_data.json, and a video without sentences, are one-line errors
    with pytest.raises(ValueError, match="needs MSRVTT_data.json"):
        pack_cli("--msrvtt", str(tmp_path / "MSRVTT_train.9k.csv"), "--out", str(tmp_path / "x"), *common)
    (tmp_path / "bad.csv").write_text("video_id\nvideo2\nvideo3\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: video 'video3' has no .*MSRVTT_data.json"):
        pack_cli(
            "--msrvtt",
            str(tmp_path / "bad.csv"),
            "--captions",
            str(tmp_path / "MSRVTT_data.json"),
            "--out",
            str(tmp_path / "x"),
            *common,
        )


CALLED = []


def mark_called(what: str) -> str:
    CALLED.append(what)
    return what


class _Payload:
    """Unpickling this calls mark_called: what a hostile pickle would do with os.system."""

    def __reduce__(self):
        return mark_called, ("code ran",)


def test_msvd_pickle_needs_trust_and_never_runs_code(tmp_path):
    root = videos(tmp_path / "YouTubeClips", "-4wsuPCjDBc_5_15", "zv2RIbUsnSw_159_165", suffix=".avi")
    frames = tmp_path / "YouTubeClips" / "ab_1_2"  # extracted frames instead of a video
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(frames / f"img_{i + 1:05d}.jpg")
    raw = {
        "-4wsuPCjDBc_5_15": [["a", "man", "slices", "bread"], ["someone", "is", "cutting", "bread"]],
        "zv2RIbUsnSw_159_165": [["a", "dog", "runs"]],
        "ab_1_2": [["a", "red", "screen"], ["red"]],
        "missing_0_1": [["never", "packed"]],
    }
    pkl = tmp_path / "raw-captions.pkl"
    pkl.write_bytes(pickle.dumps(raw))
    (tmp_path / "test_list.txt").write_text("zv2RIbUsnSw_159_165\nmissing_0_1\n\nab_1_2\n-4wsuPCjDBc_5_15\n")
    out = tmp_path / "test"
    args = ["--msvd", str(tmp_path / "test_list.txt"), "--captions", str(pkl), "--root", str(root), "--out", str(out)]
    with pytest.raises(ValueError, match=r"raw-captions.pkl: a pickle can run code .*--trust-pickle"):
        pack_cli(*args)
    pack_cli(*args, "--trust-pickle", "--shard-samples", "2")
    samples = shard_samples(out)
    assert [video_id_of(s) for s in samples] == ["zv2RIbUsnSw_159_165", "ab_1_2", "-4wsuPCjDBc_5_15"]
    assert [captions_of(s) for s in samples] == [
        ["a dog runs"],
        ["a red screen", "red"],
        ["a man slices bread", "someone is cutting bread"],
    ]
    assert "cls" not in samples[1] and sorted(k for k in samples[1] if k[0].isdigit()) == [
        f"{i:05d}.jpg" for i in range(4)
    ]
    assert [Path(r["path"]).name for r in rejects(out)] == ["missing_0_1.mp4"]
    index = json.loads((out / "index.json").read_text())
    assert index == {
        "pattern": "shard-{000000..000001}.tar",
        "samples": 3,
        "shards": {"shard-000000.tar": 1, "shard-000001.tar": 2},
        "task": "retrieval",
        "captions": 5,
        "rejected": 1,
    }
    # the same captions as JSON need no trust; a pickle referencing any callable is refused without running it
    as_json = tmp_path / "raw-captions.json"
    as_json.write_text(json.dumps(raw))
    assert load_caption_dict(as_json) == load_caption_dict(pkl, trust_pickle=True)
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"x": [_Payload()]}))
    with pytest.raises(ValueError, match=r"hostile.pkl: not a plain-data pickle .*refused"):
        load_caption_dict(hostile, trust_pickle=True)
    assert CALLED == []
    assert pickle.loads(hostile.read_bytes()) and CALLED == ["code ran"]  # the payload is real


def test_vatex_both_json_forms_english_captions_in_list_order(tmp_path):
    ids = ["Ptf_2VRj-V0_000122_000132", "G_9vN3aOaqA_000004_000014", "abc_000001_000011"]
    root = videos(tmp_path / "test_video", *ids[:2], suffix=".mp4")
    en = {ids[0]: ["A man plays a guitar.", "A person strums."], ids[1]: ["Kids swim."], ids[2]: ["Gone."]}
    official = [{"videoID": v, "enCap": en[v], "chCap": ["中文"]} for v in reversed(ids)]
    (tmp_path / "vatex_validation_v1.0.json").write_text(json.dumps(official, ensure_ascii=False))
    (tmp_path / "vatex_data.json").write_text(json.dumps({v: {"enCap": en[v]} for v in ids}))
    (tmp_path / "test_list.txt").write_text(f"{ids[1]}\n{ids[2]}\n{ids[0]}\n")
    for name in ("vatex_validation_v1.0.json", "vatex_data.json"):
        out = tmp_path / name.split(".")[0]
        pack_cli(
            "--vatex",
            str(tmp_path / "test_list.txt"),
            "--captions",
            str(tmp_path / name),
            "--root",
            str(root),
            "--out",
            str(out),
        )
        check_retrieval_pack(out, [ids[1], ids[0]], [en[ids[1]], en[ids[0]]])
        assert [Path(r["path"]).name for r in rejects(out)] == [f"{ids[2]}.mp4"]  # rejected, not silently dropped
    (tmp_path / "dup.txt").write_text(f"{ids[0]}\n{ids[1]}\n{ids[0]}\n")
    with pytest.raises(ValueError, match=rf"dup.txt:3: video '{ids[0]}' repeats line 1"):
        pack_cli(
            "--vatex",
            str(tmp_path / "dup.txt"),
            "--captions",
            str(tmp_path / "vatex_data.json"),
            "--root",
            str(root),
            "--out",
            str(tmp_path / "x"),
        )


def test_changed_captions_repack_the_shard_and_readers_refuse_classification_samples(tmp_path):
    root = videos(tmp_path / "v", "a", "b")
    items = [(str(root / "a.mp4"), "a"), (str(root / "b.mp4"), "b")]
    out = tmp_path / "out"
    pack(items, out, captions=[["one"], ["two", "three"]], shard_samples=1, workers=1, progress=False)
    stamps = [(out / f"shard-00000{i}.tar").stat().st_mtime_ns for i in range(2)]
    pack(items, out, captions=[["one"], ["two", "3"]], shard_samples=1, workers=1, progress=False)
    assert [m[CAPTIONS] for m in read_metas(str(out))] == [["one"], ["two", "3"]]
    after = [(out / f"shard-00000{i}.tar").stat().st_mtime_ns for i in range(2)]
    assert after[0] == stamps[0] and after[1] != stamps[1]  # resumable: only the changed shard is rewritten
    assert json.loads((out / "index.json").read_text())["captions"] == 3
    with pytest.raises(ValueError, match="no class labels"):
        pack(items, out, labels=["a", "b"], captions=[["one"], ["two"]])
    cls_out = tmp_path / "cls"
    pack(items, cls_out, workers=1, progress=False)
    sample = shard_samples(cls_out)[0]
    assert "cls" in sample and "task" not in json.loads((cls_out / "index.json").read_text())
    with pytest.raises(ValueError, match=r"0000000_a.json: expected a non-empty 'captions' list"):
        captions_of(sample)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--msvd", "{tmp}/l.txt", "--root", "{tmp}"], "--msvd needs --captions"),
        (["--vatex", "{tmp}/l.txt", "--captions", "{tmp}/c.json"], "need --root"),
        (["--msrvtt", "{tmp}/l.txt", "--root", "{tmp}", "--labels", "{tmp}/x.json"], "have no class labels"),
        (["--msrvtt", "{tmp}/l.txt", "--root", "{tmp}"], "l.txt: expected a header with a 'video_id' column"),
        (["--vatex", "{tmp}/l.txt", "--captions", "{tmp}/l.txt", "--root", "{tmp}"], "l.txt: not JSON"),
    ],
)
def test_retrieval_pack_bad_input_is_one_error_line(args, message, tmp_path, capsys):
    (tmp_path / "l.txt").write_text("video0\n")
    (tmp_path / "x.json").write_text('["a"]')
    argv = ["data", "pack", *(a.replace("{tmp}", str(tmp_path)) for a in args), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("i2v: error: ") and message in err and err.count("\n") == 1, err
