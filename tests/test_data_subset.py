"""`i2v data subset`: K-shot, data-percentage and fixed-list subsets as an index over a pack's shards, read by the
same loaders (key filter), `i2v data stats` and training configs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_cfg
from data_fixtures import packed_stamps

from i2v.cli import main
from i2v.config import DataCfg, load_config
from i2v.data.cli import run_stats
from i2v.data.subset import Clip, draw_percent, make_subset
from i2v.data.wds import build_eval_loader, build_train_loader, count_samples, expand_shards, steps_per_epoch
from i2v.tasks.retrieval import validate_data
from i2v.train.driver import validate


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack")
    packed_stamps(root, 18, classes=3, shard_samples=4, t=8)  # 6 clips per class, 5 shards
    return root / "shards"


def subset(src: Path, out: Path, *args: str) -> dict:
    assert main(["--verbose", "data", "subset", str(src), *args, "--out", str(out)]) == 0  # errors raise
    return json.loads((out / "index.json").read_text())


def test_k_shot_is_exactly_k_per_class_and_the_same_for_the_same_seed(src, tmp_path):
    index = subset(src, tmp_path / "a", "--shots", "2", "--seed", "5")
    assert index["classes"] == {"class0": 2, "class1": 2, "class2": 2} and index["samples"] == 6
    rec = index["subset"]
    assert (rec["rule"], rec["shots"], rec["seed"], len(rec["keys"])) == ("shots", 2, 5, 6)
    listed = (tmp_path / "a/list.txt").read_text().splitlines()
    assert Counter(line.split()[1] for line in listed) == {"0": 2, "1": 2, "2": 2}
    assert rec["list_sha256"] == hashlib.sha256((tmp_path / "a/list.txt").read_bytes()).hexdigest()
    again = subset(src, tmp_path / "b", "--shots", "2", "--seed", "5")
    assert again["subset"]["keys"] == rec["keys"]
    assert (tmp_path / "b/list.txt").read_bytes() == (tmp_path / "a/list.txt").read_bytes()
    others = {
        tuple(subset(src, tmp_path / f"s{s}", "--shots", "2", "--seed", str(s))["subset"]["keys"]) for s in range(4)
    }
    assert len(others) > 1  # the seed matters
    # No video bytes copied: the subset names the source's shards.
    assert not list((tmp_path / "a").glob("*.tar"))
    assert set(expand_shards(str(tmp_path / "a"))) <= set(expand_shards(str(src)))
    with pytest.raises(ValueError, match="class 0 'class0' has 6 clips, fewer than --shots 7"):
        subset(src, tmp_path / "c", "--shots", "7")


def test_readers_stats_and_training_configs_take_a_subset(src, tmp_path):
    dst = tmp_path / "k2"
    keys = set(subset(src, dst, "--shots", "2", "--seed", "1")["subset"]["keys"])
    report = run_stats(str(dst), frames=4, size=32, batch_size=4)
    assert (
        report["clips"] == 6 and report["labels"] == {"class0": 2, "class1": 2, "class2": 2} and not report["skipped"]
    )
    assert main(["data", "stats", str(dst), "--frames", "4", "--size", "32", "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["clips"] == 6
    assert count_samples(str(dst)) == 6  # the shard index counts the chosen clips: a true epoch is K x C clips
    cfg = DataCfg(train_shards=str(dst), val_shards=str(dst), num_classes=3, frames=4, size=32, batch_size=2,
                  num_workers=0, shuffle_buffer=4)  # fmt: skip
    assert steps_per_epoch(cfg) == 3
    seen = [k for _, _, ks in build_train_loader(cfg, seed=0, with_keys=True) for k in ks]
    assert sorted(k.split("#")[1] for k in seen) == sorted(keys)  # one epoch: every chosen clip once, nothing else
    per_rank = [
        [k for _, _, ks in build_eval_loader(cfg, rank=r, world_size=2, with_keys=True) for k in ks] for r in range(2)
    ]
    assert sorted(k.split("#")[1] for ks in per_rank for k in ks) == sorted(keys)
    validate(tiny_cfg("linear_probe", f"data.train_shards={dst}", f"data.val_shards={src}", num_classes=3))
    with pytest.raises(ValueError, match="cannot be combined with other shards"):
        build_train_loader(DataCfg(train_shards=f"{dst}::{src}", num_classes=3))


def test_fixed_list_is_imported_unchanged_and_checked(src, tmp_path):
    listing = tmp_path / "train1_few_shot_1.txt"
    listing.write_text("v000.mp4 0\nsub/v004.mp4 1\nv008.mp4 2\n")  # ViFi-CLIP's '<file> <0-based label>'
    index = subset(src, tmp_path / "vifi", "--list", str(listing))
    assert (tmp_path / "vifi/list.txt").read_bytes() == listing.read_bytes()
    assert index["subset"]["list_sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
    assert index["classes"] == {"class0": 1, "class1": 1, "class2": 1} and index["subset"]["rule"] == "list"
    assert run_stats(str(tmp_path / "vifi"), frames=4, size=32)["clips"] == 3
    for text, needle in [
        ("v000.mp4 1\n", r"v000\.mp4 has label 1 in the list but class 0 \('class0'\) in the pack"),
        ("v999.mp4 0\n", r":1: v999\.mp4 is not in the source pack"),
        ("v000.mp4\n", r":1: expected '<file name> <0-based label>'"),
        ("v000.mp4 0\nv000.mp4 0\n", r":2: v000\.mp4 is listed twice"),
    ]:
        listing.write_text(text)
        with pytest.raises(ValueError, match=needle):
            make_subset(src, tmp_path / "bad", list_path=listing)
    with pytest.raises(ValueError, match="is itself a subset"):
        make_subset(tmp_path / "vifi", tmp_path / "bad", shots=1)
    with pytest.raises(ValueError, match="holds a pack, not a subset"):
        make_subset(src, _pack_copy(src, tmp_path), shots=1)


def _pack_copy(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "another_pack"
    out.mkdir()
    (out / "index.json").write_text((src / "index.json").read_text())
    return out


def test_percentage_rules_follow_side4video():
    counts = [5, 3, 1]  # an unbalanced source: N = 9, C = 3
    clips = [Clip(f"{c}-{i}", c, f"{c}-{i}.mp4", "s") for c, n in enumerate(counts) for i in range(n)]
    labels = ["a", "b", "c"]
    keys = lambda chosen: [c.key for c in chosen]  # noqa: E731
    chosen, _ = draw_percent(clips, labels, 0.5, "random", seed=3)
    assert len(chosen) == 4 and keys(chosen) == keys(draw_percent(clips, labels, 0.5, "random", seed=3)[0])
    chosen, short = draw_percent(clips, labels, 0.5, "first", seed=0)  # floor(9 * .5) // 3 = 1 per class, file order
    assert keys(chosen) == ["0-0", "1-0", "2-0"] and short == []
    chosen, short = draw_percent(clips, labels, 1.0, "per_class", seed=0)  # quota 3: class c is short
    assert Counter(c.label for c in chosen) == {0: 3, 1: 3, 2: 1} and short == [(2, 1, 3)]
    chosen, _ = draw_percent(clips, labels, 0.34, "class_count", seed=0)  # int(3 * .34) = 1 class: the largest
    assert {c.label for c in chosen} == {0} and len(chosen) == 5
    chosen, _ = draw_percent(clips, labels, 0.67, "class_ids", seed=0)  # classes 0 .. 1
    assert {c.label for c in chosen} == {0, 1} and len(chosen) == 8
    with pytest.raises(ValueError, match=r"--percent: 1.5 must be in \(0, 1\]"):
        draw_percent(clips, labels, 1.5, "first", seed=0)
    with pytest.raises(ValueError, match="keeps no class"):
        draw_percent(clips, labels, 0.2, "class_ids", seed=0)


def test_cli_percent_records_rule_seed_and_counts(src, tmp_path):
    index = subset(src, tmp_path / "p", "--percent", "0.5", "--rule", "per_class", "--seed", "2")
    assert index["classes"] == {"class0": 3, "class1": 3, "class2": 3}
    rec = index["subset"]
    assert (rec["rule"], rec["percent"], rec["seed"], rec["source_samples"]) == ("percent/per_class", 0.5, 2, 18)


def test_retrieval_packs_get_caption_stats_and_percent_subsets(tmp_path, capsys):
    """A retrieval pack (`synth --captions`): `data stats` counts videos, captions per video and caption lengths over
    the (video, caption) pairs training reads; `data subset --percent` keeps whole videos with all their captions, and
    the subset is still a retrieval pack (stats, caption count, training config check); class rules are refused."""
    from i2v.data.retrieval import read_metas
    from i2v.data.synth_captions import make_captioned
    from i2v.data.wds import count_captions

    src = Path(make_captioned(tmp_path / "caps", train=8, test=2, frames=4, size=24, shard_samples=4).train).parent
    metas = read_metas(str(src))
    report = run_stats(str(src), frames=4, size=24, batch_size=4)
    words = [len(c.split()) for m in metas for c in m["captions"]]
    assert (report["task"], report["videos"], report["skipped"]) == ("retrieval", 8, 0)
    assert report["captions"] == report["clips"] == sum(len(m["captions"]) for m in metas) == 24
    assert report["captions_per_video"] == {"min": 3, "mean": 3.0, "max": 3}
    assert report["caption_words"]["min"] == min(words) and report["caption_words"]["max"] == max(words)
    assert report["caption_tokens"]["min"] >= 1 and report["truncated"] == 0
    assert main(["data", "stats", str(src), "--frames", "4", "--size", "24"]) == 0
    assert "videos:   8" in capsys.readouterr().out

    index = subset(src, tmp_path / "half", "--percent", "0.5", "--seed", "1")
    assert (index["task"], index["samples"], index["captions"]) == ("retrieval", 4, 12)
    assert not (tmp_path / "half/labels.json").exists()
    kept = (tmp_path / "half/list.txt").read_text().split()
    assert len(kept) == 4 and set(kept) <= {m["video_id"] for m in metas}
    assert count_captions(str(tmp_path / "half")) == 12
    half = run_stats(str(tmp_path / "half"), frames=4, size=24, batch_size=4)
    assert (half["videos"], half["captions"]) == (4, 12)
    cfg = load_config(None, ["task=retrieval", f"data.train_shards={tmp_path / 'half'}"])
    validate_data(cfg)  # a retrieval subset passes the retrieval shard check
    for args in (["--shots", "1"], ["--percent", "0.5", "--rule", "first"]):
        with pytest.raises(ValueError, match="a retrieval pack .* has no classes"):
            subset(src, tmp_path / "bad", *args)
