"""Training through Ray Train (2 CPU workers, gloo, ZeRO-3 partitioned tiny backbone) on the synthetic benchmark.

One private local Ray cluster serves the module. The runs are small (4 steps per epoch, 2 epochs) but real:
shards -> resampled WebDataset loaders -> DeepSpeed -> checkpoints through `ray.train.Checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_METHOD

from i2v.cli import main
from i2v.config import ConfigError, load_config
from i2v.train.driver import run_training, validate

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from i2v.data.synth import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("synth"), classes=("move_right", "move_left"), train=64, val=16, frames=8, size=32
    )


def smoke_overrides(shards, method="side4video", *overrides) -> list[str]:
    return [
        f"method.name={method}",
        *(TINY_METHOD[method] if method != "side4video" else []),  # smoke.yaml's side network is already tiny
        f"data.train_shards={shards.train}",
        f"data.val_shards={shards.val}",
        "data.size=32",
        "data.num_workers=0",
        "train.epochs=2",
        "train.cpus_per_worker=1",
        *overrides,
    ]


def smoke(shards, method="side4video", *overrides):
    return load_config(ROOT / "configs/smoke.yaml", list(overrides), defaults=smoke_overrides(shards, method))


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=False)["model"]


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.fixture(scope="module")
def shm_before(ray_cluster) -> set[str]:
    return shm_segments()


@pytest.fixture(scope="module")
def uninterrupted(shards, shm_before, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    summary = run_training(smoke(shards), out, progress=False)
    return out, summary


def test_run_writes_summary_and_final_checkpoint(uninterrupted):
    out, summary = uninterrupted
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("val_top1", "val_top5", "epoch", "train_clips_per_s", "peak_mem_mb"):
        assert on_disk[key] is not None, key
    assert on_disk["epoch"] == 2 and on_disk["steps"] == 2 * 4  # 64 clips / (2 ranks x batch 8) per epoch
    assert 0.0 <= on_disk["val_top1"] <= 1.0 and on_disk["peak_mem_mb"] > 0
    assert (out / "final.pt").is_file() and any((out / "tensorboard").iterdir())


def test_killed_worker_restarts_from_the_last_checkpoint_bit_identically(uninterrupted, shards, tmp_path):
    # The last worker dies at the first step of epoch 2; Ray restarts the group from the epoch-1 checkpoint.
    out = tmp_path / "faulty"
    summary = run_training(
        smoke(shards, "side4video", "train.fail_at_step=4", "train.max_failures=1"), out, progress=False
    )
    assert (out / "fault_injected").exists()
    assert summary["steps"] == uninterrupted[1]["steps"] == 8
    expected = weights(uninterrupted[0])
    got = weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_by_name_after_a_failed_run_is_bit_identical(uninterrupted, shards, tmp_path):
    out = tmp_path / "resumed"
    cfg_args = ["side4video", "train.fail_at_step=4", "train.max_failures=0"]
    with pytest.raises(Exception, match="injected fault"):
        run_training(smoke(shards, *cfg_args), out, progress=False)
    assert not (out / "summary.json").exists()
    # `i2v train` with the same run directory picks the run up from its epoch-1 checkpoint.
    overrides = smoke_overrides(shards, *cfg_args)
    assert main(["train", str(ROOT / "configs/smoke.yaml"), *overrides, "--out", str(out), "--no-progress"]) == 0
    expected, got = weights(uninterrupted[0]), weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_mid_epoch_resume_restores_each_ranks_rng_and_reports_scalars_only(shards, ray_cluster, tmp_path):
    """A worker dies mid-epoch, after the step-2 checkpoint; Ray restarts both ranks from it. Every rank's RNG state
    travels in that checkpoint (Ray merges the ranks' files), and reports carry no per-class lists."""
    from i2v.train.driver import make_trainer, summarise

    out = tmp_path / "mid_epoch"
    out.mkdir()
    overrides = ("train.epochs=1", "train.checkpoint_every=2", "train.fail_at_step=3", "train.max_failures=1")
    cfg = smoke(shards, "st_adapter", *overrides, "train.keep_checkpoints=3")
    result = make_trainer(cfg, out).fit()
    summary = summarise(cfg, out, result)
    assert (out / "fault_injected").exists() and summary["steps"] == 4

    assert all(isinstance(v, (int, float, str)) for v in result.metrics.values()), result.metrics
    details = json.loads((out / "eval" / "epoch_001.json").read_text())
    assert details == json.loads((out / "eval" / "latest.json").read_text())
    assert len(details["confusion"]) == 2 and sum(map(sum, details["confusion"])) == details["val_clips"] == 16
    assert summary["val_per_class"] == details["val_per_class"] and len(details["val_per_class"]) == 2

    # The mid-epoch checkpoint the run resumed from, and the end of the epoch (a restart from scratch would have
    # written a second step-2 checkpoint).
    checkpoints = sorted(d for d in out.glob("checkpoint_*") if d.is_dir())
    assert [torch.load(d / "state.pt", weights_only=False)["step"] for d in checkpoints] == [2, 4]
    for d in checkpoints:
        rng = [torch.load(d / "rng" / f"rank_{r:03d}.pt", weights_only=False) for r in range(2)]
        assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
        assert rng[0]["python"] != rng[1]["python"]


def test_a_cohort_survives_a_killed_worker_and_each_member_ends_as_its_solo_run(uninterrupted, shards, tmp_path):
    """4 members on one ZeRO-3 backbone (2 workers), the last worker killed at the first step of epoch 2: member 0 is
    the smoke config itself and ends bit-identical to its uninterrupted solo run; member 3 diverges and is dropped
    with a record while the others train on (tests/test_cohort.py checks every member against its solo run)."""
    from i2v.train.checkpoint import load_trainable

    members = "[{}, {method.side_width: 32}, {train.lr: 5.0e-3, train.grad_clip: 1.0}, {train.lr: 1.0e+30}]"
    out = tmp_path / "cohort"
    cfg = smoke(shards, "side4video", f"train.cohort={members}", "train.fail_at_step=4", "train.max_failures=1")
    summary = run_training(cfg, out, progress=False)
    assert (out / "fault_injected").exists() and summary["cohort"] == 4 and summary["steps"] == 8
    rows = summary["members"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "diverged"]
    assert isinstance(rows[3]["diverged_at_step"], int) and rows[3]["diverged_at_step"] >= 1
    assert json.loads((out / "summary.json").read_text())["members"] == rows
    for k, r in enumerate(rows):
        assert r["checkpoint"] == str(out / "members" / f"{k:02d}" / "final.pt")
        assert json.loads((out / "members" / f"{k:02d}" / "summary.json").read_text()) == r
    for r in rows[:3]:
        assert 0.0 <= r["val_top1"] <= 1.0 and r["epoch"] == 2 and len(r["val_per_class"]) == 2
    expected = weights(uninterrupted[0])
    got, member_cfg = load_trainable(rows[0]["checkpoint"])
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert (
        member_cfg["train"]["cohort"] == [] and load_trainable(rows[1]["checkpoint"])[1]["method"]["side_width"] == 32
    )
    with pytest.raises(ValueError, match="holds a whole cohort"):
        load_trainable(next(out.glob("checkpoint_*")))


@pytest.mark.parametrize("method", ["st_adapter", "linear_probe"])
def test_other_methods_train_by_a_one_word_override(method, shards, ray_cluster, tmp_path):
    summary = run_training(smoke(shards, method, "train.epochs=1"), tmp_path / method, progress=False)
    assert summary["steps"] == 4 and summary["val_top1"] is not None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.side_width=48"], "side_width: 48 must be a multiple of method.side_head_dim=32"),
        (["method.kernel_t=9"], "data.frames: 8 is shorter than method.kernel_t=9"),
        (
            ["data.train_shards=/nonexistent/shard-{000000..000003}.tar"],
            "data.train_shards: 4 of 4 shards do not exist",
        ),
        (["data.num_classes=5"], "data.num_classes: 5, but the label map next to the shards has 2 classes"),
    ],
)
def test_bad_configs_fail_before_any_worker_starts(overrides, needle, shards):
    import ray

    was_running = ray.is_initialized()
    shard_overrides = [f"data.train_shards={shards.train}", f"data.val_shards={shards.val}"]
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides, defaults=shard_overrides)
    with pytest.raises(ConfigError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        validate(cfg)
    assert ray.is_initialized() == was_running


def test_cli_reports_config_errors_without_starting_ray(capsys):
    assert main(["train", str(ROOT / "configs/smoke.yaml"), "method.name=nope"]) == 2
    assert "method.name: unknown method 'nope'" in capsys.readouterr().err


def test_runs_leave_no_deepspeed_shared_memory_behind(shm_before, uninterrupted):
    """DeepSpeed's CPU all-reduce op creates a ~66 MB /dev/shm segment per rank and never unlinks it: every run (and
    every killed worker) used to leave them in RAM until reboot, until Ray's OOM killer took later trials. The runs of
    this module, a killed worker's included, must leave none."""
    assert shm_segments() - shm_before == set()
