"""The benchmark harness on the tiny backbone: records, reference rows, reports. No timing asserts (STYLE.md)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import ROOT, TINY_VIT

from i2v import bench, plan
from i2v.bench import CEILING, FLOOR, LiveBytes, saved_bytes

TINY_CLIP = str(ROOT / "configs/backbones/i2v-tiny-clip.json")  # vision + text towers
REQUIRED = {"method", "peak_mem_mb", "act_mem_mb", "step_s", "trainable_params", "peak_live_mb"}


def test_a_row_runs_in_a_fresh_process():
    spec = dict(row=FLOOR, backbone=TINY_VIT, frames=4, batch=2, device="cpu", steps=1, warmup=0)
    record = bench.run_isolated(spec | dict(num_classes=5, overrides=[], threads=1))
    assert REQUIRED <= record.keys() and record["method"] == FLOOR and record["threads"] == 1


def test_train_harness_writes_records_with_reference_rows_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_isolated", bench.train_worker)  # in-process here; the test above covers spawning
    records = bench.bench_train(TINY_VIT, frames=4, batch=2, methods="m_adapter", steps=1, warmup=0, num_classes=5)
    assert [r["method"] for r in records] == [FLOOR, "m_adapter", CEILING]
    assert all(REQUIRED <= r.keys() for r in records)
    floor, side, full = records
    assert floor["trainable_params"] == 0 and floor["act_mem_mb"] > 0
    assert side["trainable_params"] > 0 and full["trainable_params"] > 0
    assert side["act_vs_floor"] == pytest.approx(side["act_mem_mb"] / floor["act_mem_mb"])
    assert full["act_vs_full"] == pytest.approx(1.0)

    paths = bench.write_outputs(records, tmp_path / "train.json", "train")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text()) == records
    assert all(f"| `{r['method']}` |" in paths[1].read_text() for r in records)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infer_worker_reports_merged_latency_against_the_image_tower():
    spec = dict(row="zeroi2v", backbone=TINY_VIT, frames=4, batch=1, device="cpu", steps=1, warmup=0)
    r = bench.infer_worker(spec | dict(num_classes=5, overrides=[], mode="infer"))
    assert r["method"] == "zeroi2v" and r["latency_s"] > 0 and r["merged_latency_s"] > 0 and r["backbone_s"] > 0
    assert r["merged_vs_backbone"] == pytest.approx(r["merged_latency_s"] / r["backbone_s"])


def test_saved_bytes_counts_each_storage_once_and_skips_weights():
    w = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(256, requires_grad=True)
    assert saved_bytes(lambda: x * x) == 256 * 4  # saved twice (both operands), one storage
    assert saved_bytes(lambda: x[:128] * x[128:]) == 256 * 4  # two views of one storage
    assert saved_bytes(lambda: x * w, exclude=[w]) == 256 * 4
    with torch.no_grad():
        assert saved_bytes(lambda: x * w) == 0


def test_live_bytes_follows_allocations_to_their_release():
    with LiveBytes() as live:
        a = torch.ones(1000)
        b = a * 2
        a.add_(1)  # in place: no new memory
        del a, b
        c = torch.ones(10)
    assert live.peak == 2 * 4000 and live.live == c.nbytes


def test_cpu_peak_rss_can_be_reset_and_read():
    cpu = torch.device("cpu")
    bench.reset_peak(cpu)
    base, _ = bench.current_mb(cpu)
    x = torch.ones(64 * 2**20 // 4)
    del x
    peak, _ = bench.peak_mb(cpu)
    assert peak - base > 50


def test_parsers_register_their_commands():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    plan.add_parser(sub)
    args = parser.parse_args(["bench", "train", "--methods", "side4video,st_adapter_24x384", "--json", "x.json"])
    assert args.func is bench._cmd and args.batch == 2 and args.methods == "side4video,st_adapter_24x384"
    args = parser.parse_args(["bench", "infer"])
    assert args.func is bench._cmd and args.batch == 1
    args = parser.parse_args(["plan", "--backbone", "EVA02-E-14", "--gpus", "8", "--gpu-mem", "80"])
    assert args.func is plan._cmd and args.gpus == 8 and args.precision == "bf16"
    with pytest.raises(ValueError, match="unknown"):
        bench.expand_methods("side4video,nope")


def test_cohort_bench_measures_cohorts_against_separate_steps_and_projects_flops():
    spec = dict(row="side4video", backbone=TINY_VIT, frames=4, batch=2, device="cpu", steps=1, warmup=0)
    spec |= dict(num_classes=5, overrides=["method.side_width=32", "method.side_head_dim=16"], sizes=[1, 2])
    rows = bench.cohort_worker(spec)
    assert [r["cohort"] for r in rows] == [1, 2]
    for r in rows:
        assert r["step_s"] > 0 and r["separate_step_s"] > 0
        assert r["ratio"] == pytest.approx(r["step_s"] / r["separate_step_s"])
    assert rows[0]["weights_mb"] == pytest.approx(rows[0]["separate_weights_mb"])
    assert rows[1]["weights_mb"] < rows[1]["separate_weights_mb"]  # one backbone for two members
    cfg = bench.row_config("side4video", TINY_VIT, 4, 5, spec["overrides"])
    flops = bench.cohort_flops(cfg)
    assert flops["backbone"] > 0 and flops["side"] > 0
    ratios = [p["flop_ratio"] for p in bench.project_cohort(flops, [1, 2, 4])]
    assert ratios[0] == pytest.approx(1.0) and ratios[0] > ratios[1] > ratios[2]
    b, s = flops["backbone"], flops["side"]
    assert ratios[2] == pytest.approx((b + 4 * s) / (4 * (b + s)))
    md = bench.markdown_cohort({"rows": [r | {"flop_ratio": 1.0} for r in rows], "projection": None})
    assert "| 2 |" in md


def test_retrieval_bench_compares_side4video_with_fine_tuned_clip4clip(tmp_path, monkeypatch, capsys):
    """`i2v bench retrieval` end to end on the tiny CLIP (vision + text towers): every row trains (positive figures),
    Side4Video's frozen tower under no_grad keeps fewer saved bytes than fine-tuning both towers, and the figure's
    ratios sit beside the measured ones."""
    from i2v.cli import main as i2v_main

    monkeypatch.setattr(bench, "run_isolated", bench.retrieval_worker)  # in-process; spawning is tested above
    out = tmp_path / "retrieval.json"
    args = ["bench", "retrieval", "--backbone", TINY_CLIP, "--frames", "4", "--batch", "4", "--steps", "1"]
    args += ["--warmup", "0", "--side-set", "method.side_width=16", "method.side_head_dim=8", "--json", str(out)]
    assert i2v_main(args) == 0
    records = json.loads(out.read_text())
    rows = {r["method"]: r for r in records}
    assert list(rows) == ["clip4clip", "clip4clip_frozen_vit", "side4video"]
    for r in records:
        for key in ("act_mem_mb", "peak_live_mb", "peak_mem_mb", "total_mem_mb", "step_s", "trainable_params"):
            assert r[key] > 0, (r["method"], key)
    full, side = rows["clip4clip"], rows["side4video"]
    assert full["vision_trainable_params"] > 0 and side["vision_trainable_params"] == 0
    assert side["act_mem_mb"] < full["act_mem_mb"]
    assert side["act_mem_vs_clip4clip"] == pytest.approx(side["act_mem_mb"] / full["act_mem_mb"])
    assert side["paper_vs_clip4clip"] == pytest.approx(5.8 / 8.2)
    assert (full["interaction"], side["interaction"]) == ("mean", "wti")
    md = out.with_suffix(".md").read_text()
    assert all(f"| `{name}` |" in md for name in rows) and md in capsys.readouterr().out
    with pytest.raises(ValueError, match="--rows"):
        bench.bench_retrieval(TINY_CLIP, rows=["side4video"])
