"""The memory planner: its fake-tensor activation model against real CPU measurements on the tiny backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_METHOD, TINY_VIT, tiny_cfg

from i2v import bench
from i2v.methods import create_method, create_model, list_methods
from i2v.plan import format_plan, format_validation, linear, measure_step, plan, predict, validate


def measured(cfg, batch: int) -> tuple[int, int]:
    """(saved-for-backward bytes, step peak of live bytes) of a real CPU training step after one warm-up step."""
    model = create_model(cfg).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    video = torch.randn(batch, cfg.data.frames, 3, 32, 32)
    labels = torch.randint(0, cfg.data.num_classes, (batch,))
    bench.train_step(model, opt, video, labels)
    opt.zero_grad(set_to_none=True)
    weights = [*model.parameters(), *model.buffers()]
    with bench.LiveBytes() as live:
        saved = bench.saved_bytes(lambda: bench.train_step(model, opt, video, labels), weights)
    return saved, live.peak


@pytest.mark.parametrize(
    "method, overrides",
    [(m, []) for m in list_methods()] + [("side4video", ["method.lean_activations=false"])],  # + plain autograd
)
def test_planner_predicts_measured_memory_within_15_percent(method, overrides):
    cfg = tiny_cfg(method, *overrides)
    m = measure_step(cfg, (1, 2))  # fitted on 1 and 2 clips ...
    saved, live = measured(cfg, 3)  # ... checked on 3
    fixed, per_clip = linear(m["saved"])
    assert fixed + 3 * per_clip == pytest.approx(saved, rel=0.15)
    fixed, per_clip = linear(m["live"])
    assert fixed + 3 * per_clip == pytest.approx(live, rel=0.15)


def test_plan_terms_fit_and_largest_batch():
    p = plan(tiny_cfg("side4video"), batch=4, gpus=4, gpu_mem_gb=1.0, headroom=0.0, amp=False)
    rep, z3 = p["partitions"]["replicate"], p["partitions"]["zero3"]
    assert z3["frozen_weights_gb"] < rep["frozen_weights_gb"]
    assert z3["trainable_and_adamw_gb"] == rep["trainable_and_adamw_gb"]  # side network: DDP, replicated
    for part in (rep, z3):
        terms = part["frozen_weights_gb"] + part["trainable_and_adamw_gb"] + part["step_peak_gb"]
        assert part["total_gb"] == pytest.approx(terms)
        assert part["fits"] and part["max_batch"] >= 4
        # the largest batch fits and one more does not
        room = p["usable_gb"] - part["frozen_weights_gb"] - part["trainable_and_adamw_gb"] - p["step_fixed_gb"]
        assert part["max_batch"] * p["step_per_clip_gb"] <= room < (part["max_batch"] + 1) * p["step_per_clip_gb"]
    assert "largest batch per GPU" in format_plan(p)
    with pytest.raises(ValueError, match="task: retrieval: i2v plan models classification steps only"):
        plan(tiny_cfg("side4video", "task=retrieval"), batch=4, gpus=1, gpu_mem_gb=1.0)  # not the classifier's plan


def test_predict_partitions_in_block_methods_and_reports_what_does_not_fit():
    m = measure_step(tiny_cfg("st_adapter"), (1, 2))
    p = predict(m, batch=2, gpus=4, gpu_mem_gb=1.0)["partitions"]
    # joint ZeRO-3 engine: trainable weights and AdamW states are sharded too
    assert p["zero3"]["trainable_and_adamw_gb"] == pytest.approx(p["replicate"]["trainable_and_adamw_gb"] / 4)
    tight = predict(m, batch=2, gpus=1, gpu_mem_gb=1e-4)["partitions"]["replicate"]
    assert not tight["fits"] and tight["max_batch"] == 0


def test_bf16_runs_the_step_under_autocast_with_half_size_frozen_weights():
    fp32 = measure_step(tiny_cfg("m_adapter"), (1, 2))
    bf16 = measure_step(tiny_cfg("m_adapter", "backbone.precision=bf16"), (1, 2), amp=True)
    assert bf16["frozen"] == pytest.approx(fp32["frozen"] / 2, rel=0.01)
    assert 0 < linear(bf16["live"])[1] < linear(fp32["live"])[1]


@pytest.mark.parametrize("method", ["st_adapter", "side4video"])  # side4video: its recomputing autograd functions
def test_validate_compares_with_benchmark_records(method):
    # a bf16 backbone under autocast, as on GPUs: the planner follows the benchmark's dtypes
    spec = dict(row=method, backbone=TINY_VIT, frames=4, batch=2, device="cpu", steps=1, warmup=1, amp=True)
    overrides = ["backbone.precision=bf16", *TINY_METHOD[method]]
    record = bench.train_worker(spec | dict(num_classes=5, overrides=overrides))
    (row,) = validate([record])
    assert abs(row["act_mem_mb_err"]) < 0.15 and abs(row["peak_live_mb_err"]) < 0.15
    assert row["peak_mem_mb_pred"] > row["peak_live_mb_pred"] > 0
    assert f"`{method}`" in format_validation([row])


def test_a_cohort_plan_holds_the_backbone_once_and_matches_a_measured_cohort_step():
    cfg = tiny_cfg("side4video")
    solo, four = measure_step(cfg, (1, 2)), measure_step(cfg, (1, 2), cohort=4)
    model = create_model(cfg, device="meta")
    own_buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.startswith("backbone."))
    assert four["members"] == 4 and four["trainable"] == 4 * solo["trainable"]
    assert four["frozen"] == solo["frozen"] + 3 * own_buffers  # the backbone once, each member's BatchNorm statistics
    # members back-propagate in turn: the per-clip step peak stays one member's, the other members' gradients add a
    # fixed part
    assert linear(four["live"])[1] == pytest.approx(linear(solo["live"])[1], rel=0.05)
    assert linear(four["live"])[0] >= linear(solo["live"])[0] + 3 * solo["trainable"]
    # the fake-tensor cohort step against a real one: 4 members on one backbone, batch 3
    models = [create_model(cfg).train()]
    models += [create_method(cfg.method, models[0].backbone, num_classes=5, num_frames=4).train() for _ in range(3)]
    video, labels = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 5, (3,))
    weights = list({id(t): t for m in models for t in (*m.parameters(), *m.buffers())}.values())

    with bench.LiveBytes() as live, models[0].backbone.shared_outputs():
        saved = max(
            bench.saved_bytes(lambda m=m: torch.nn.functional.cross_entropy(m(video), labels).backward(), weights)
            for m in models
        )
    fixed, per_clip = linear(four["saved"])
    assert fixed + 3 * per_clip == pytest.approx(saved, rel=0.15)
    fixed, per_clip = linear(four["live"])
    assert fixed + 3 * per_clip == pytest.approx(live.peak, rel=0.15)

    p = plan(cfg, batch=2, gpus=1, gpu_mem_gb=0.05, headroom=0.0, amp=False, cohort=4)
    for part in p["partitions"].values():
        assert part["solo_total_gb"] < part["total_gb"] and part["per_member_gb"] > 0
        k = part["max_cohort"]  # the largest cohort fits and one more member does not
        assert part["solo_total_gb"] + (k - 1) * part["per_member_gb"] <= p["usable_gb"]
        assert part["solo_total_gb"] + k * part["per_member_gb"] > p["usable_gb"]
    assert "largest cohort at this batch" in format_plan(p) and "cohort of 4 members" in format_plan(p)
    with pytest.raises(ValueError, match="already lists its members"):
        measure_step(tiny_cfg("side4video", "train.cohort=[{}, {}]"), cohort=2)
