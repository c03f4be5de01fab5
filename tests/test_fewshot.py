"""Few-shot protocol runs (tune/fewshot.py): a repeated-seed Ray Tune grid over K and method on the synthetic
benchmark gives the `K x method` table with mean ± std, and every trial's summary records the protocol."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml
from conftest import ROOT

from tune.fewshot import aggregate, main, table

pytestmark = pytest.mark.timeout(900)


def test_table_is_mean_and_sample_std_over_seeds():
    rows = [
        {"method": m, "shots": k, "seed": s, "status": st, "val_top1": v, "best_val_top1": v}
        for m, k, s, st, v in [
            ("side4video", 2, 0, "ok", 0.5),
            ("side4video", 2, 1, "ok", 0.7),
            ("side4video", 2, 2, "failed", None),
            ("zeroi2v", 2, 0, "ok", 0.6),
            ("side4video", 4, 0, "ok", 0.8),
            ("side4video", 4, 1, "ok", 0.9),
        ]
    ]
    agg = aggregate(rows, "shots", "final")
    assert agg[2]["side4video"] == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(statistics.stdev([0.5, 0.7])),
        "n": 2,
    }
    assert agg[2]["zeroi2v"]["std"] is None and agg[4].keys() == {"side4video"}
    md = table(agg, "shots", ["side4video", "zeroi2v"]).splitlines()
    assert md[0] == "| K | side4video | zeroi2v |"
    assert md[2] == "| 2 | 60.00 ± 14.14 (n=2) | 60.00 ± – (n=1) |"
    assert md[3] == "| 4 | 85.00 ± 7.07 (n=2) |  |"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from i2v.data.synth import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("synth"), classes=("move_right", "move_left"), train=16, val=8, frames=8, size=32
    )


def test_repeated_seed_protocol_gives_k_by_method_table(shards, ray_cluster, tmp_path):
    probe = tmp_path / "linear_probe.yaml"  # a second method: the smoke config with a linear probe
    smoke = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    probe.write_text(yaml.safe_dump(smoke | {"method": {"name": "linear_probe"}}))
    out = tmp_path / "protocol"
    source = str(ROOT / shards.train).rsplit("/", 1)[0]  # the pack output directory of the training split
    argv = [str(ROOT / "configs/smoke.yaml"), str(probe), "--source", source, "--shots", "1", "--repeats", "2"]
    settings = [f"data.val_shards={shards.val}", "data.size=32", "data.num_workers=0", "data.batch_size=2",
                "backbone.partition=replicate", "train.num_workers=1", "train.epochs=1"]  # fmt: skip
    assert main([*argv, "--epochs", "repeat", "--max-concurrent", "4", "--out", str(out), "--set", *settings]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows  # one K keeps this test short
    assert {(r["method"], r["shots"], r["seed"]) for r in rows} == {
        (m, "1", s) for m in ("side4video", "linear_probe") for s in ("0", "1")
    }
    for r in rows:
        summary = json.loads((tmp_path / r["run_dir"] / "summary.json").read_text())
        rec = summary["protocol"]
        k, seed = int(r["shots"]), int(r["seed"])
        assert (rec["shots"], rec["seed"], rec["train_clips"], rec["epochs"]) == (k, seed, 2 * k, "repeat")
        assert rec["epoch_clips"] == 2 * k * (16 // (2 * k))  # Side4Video's repeat-to-full-length
        assert rec["test"] == shards.val and rec["test_clips"] == 8 and rec["views"] == 1
        listed = (out / "subsets" / f"k{k}-s{seed}" / "list.txt").read_bytes()
        import hashlib

        assert rec["list_sha256"] == hashlib.sha256(listed).hexdigest() == r["list_sha256"]
        assert summary["steps"] == rec["epoch_clips"] // 2 and 0 <= summary["val_top1"] <= 1
    md = (out / "results.md").read_text().splitlines()
    assert md[0] == "| K | linear_probe | side4video |"
    assert md[2].startswith("| 1 | ") and md[2].count("± ") == 2 and "(n=2)" in md[2]
    cells = json.loads((out / "protocol.json").read_text())["table"]
    for c in cells:
        vals = [float(r["val_top1"]) for r in rows if r["method"] == c["method"] and int(r["shots"]) == c["shots"]]
        assert c["n"] == 2 and c["mean"] == pytest.approx(statistics.fmean(vals))
        assert c["std"] == pytest.approx(statistics.stdev(vals))
    assert (out / "fewshot.png").stat().st_size > 0


def test_a_fewshot_config_per_dataset_and_method_names_its_protocol():
    from i2v.config import load_config

    for method in ("side4video", "zeroi2v", "st_adapter"):
        for dataset, classes in (("hmdb51", 51), ("ucf101", 101), ("ssv2", 174)):
            (path,) = (ROOT / "configs/experiments").glob(f"{method}_vit-b16-openai_*fewshot-vificlip_{dataset}.yaml")
            assert "follows ViFi-CLIP's few-shot protocol" in path.read_text().splitlines()[0]
            cfg = load_config(path)
            assert (cfg.method.name, cfg.data.num_classes, cfg.data.frames, cfg.train.epochs) == (
                method,
                classes,
                32,
                50,
            )
            assert cfg.data.test_clips * cfg.data.test_crops == 1 and cfg.backbone.name == "ViT-B-16"


def test_protocol_subsets_for_shots_percent_and_fixed_lists(shards, tmp_path):
    import hashlib

    from tune.fewshot import draw_subsets

    source = str(ROOT / shards.train).rsplit("/", 1)[0]
    subs = draw_subsets(source, tmp_path, [1, 3], [0, 1], "shots", "random", {})
    assert {k: v["samples"] for k, v in subs.items()} == {"1/0": 2, "1/1": 2, "3/0": 6, "3/1": 6}
    assert subs["3/0"]["list_sha256"] != subs["3/1"]["list_sha256"]  # a new draw per seed
    subs = draw_subsets(source, tmp_path, [0.5], [0], "percent", "per_class", {})
    assert subs["0.5/0"]["samples"] == 8 and subs["0.5/0"]["rule"] == "percent/per_class"
    listing = tmp_path / "train1_few_shot_1.txt"
    names = (tmp_path / "subsets/k1-s0/list.txt").read_text()
    listing.write_text(names)
    subs = draw_subsets(source, tmp_path, [1], [0, 1], "shots", "random", {1: str(listing)})
    assert subs["1/0"]["dir"] == subs["1/1"]["dir"] == str(tmp_path / "subsets/k1-list")  # seeds vary training only
    assert subs["1/0"]["list_sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
