"""Ray Tune sweeps (tune/): a 2 widths x 2 learning rates ASHA sweep on the synthetic benchmark, a sweep with a
failing trial, resuming a finished sweep, and re-training the best config with `i2v train`."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tiny_cfg

from i2v.backbone import load_backbone
from i2v.cli import main as i2v_main
from i2v.config import ConfigError
from tune.spaces import load_space
from tune.sweep import (
    DRIVER_RESOURCE,
    count_trials,
    group_cohorts,
    plan_sweep,
    results_table,
    sample_configs,
    sweep_metric,
    write_outputs,
)
from tune.sweep import main as sweep_main

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from i2v.data.synth import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("synth"), classes=("move_right", "move_left"), train=32, val=16, frames=8, size=32
    )


def settings(shards) -> list[str]:
    """Small, fast trials: one replicated worker each, 4 steps per epoch."""
    return [
        f"data.train_shards={shards.train}",
        f"data.val_shards={shards.val}",
        "data.size=32",
        "data.num_workers=0",
        "backbone.partition=replicate",
        "train.num_workers=1",
        "method.side_head_dim=16",
    ]


def write_space(tmp_path, widths, lrs):
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({"method": {"side4video": {"side_width": {"grid": widths}}}, "train": {"lr": {"grid": lrs}}})
    )
    return str(path)


def read_rows(out):
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_named_bottleneck_space_follows_the_method():
    assert set(load_space("bottleneck", "st_adapter")) == {"method.bottleneck", "train.lr"}
    assert set(load_space("bottleneck", "side4video")) == {"method.side_width", "train.lr"}
    assert set(load_space("bottleneck", "m_adapter")) == {"method.width", "train.lr"}
    with pytest.raises(ValueError, match="no entry for method 'linear_probe'"):
        load_space("bottleneck", "linear_probe")


def test_a_retrieval_sweep_optimises_t2v_r1(tmp_path):
    """Without Ray: a retrieval config's sweep ranks trials by T2V R@1 (max) where classification uses val top-1, and
    the results table, best.yaml and the trainable-parameter count (text tower and WTI included) follow it."""
    import pandas as pd

    from i2v.config import load_config
    from i2v.tasks import get_task

    tiny_clip = str(ROOT / "configs/backbones/i2v-tiny-clip.json")
    base = load_config(
        None,
        [],
        defaults=["task=retrieval", f"backbone.name={tiny_clip}", "data.frames=4", "method.name=side4video"]
        + ["method.side_width=32", "method.side_head_dim=16"],
    )
    assert sweep_metric(base) == ("t2v_r1", "max") and sweep_metric(tiny_cfg("side4video")) == ("val_top1", "max")

    class Result:  # what results_table reads of a ray.tune Result
        def __init__(self, trial: str, width: int, r1: list[float], top1: list[float]):
            self.path, self.config, self.error, self.metrics = (
                f"trial_fn_{trial}",
                {"method.side_width": width},
                None,
                {},
            )
            epochs = {"epoch": [1, 2], "t2v_r1": r1, "val_top1": top1, "peak_mem_mb": [9.0, 9.0]}
            self.metrics_dataframe = pd.DataFrame(epochs | {"train_clips_per_s": [1.0, 1.0], "done": [False, True]})
            self.metrics = {"done": True}

    results = [Result("aaaaa_00000", 16, [10.0, 20.0], [0.9, 0.9]), Result("bbbbb_00001", 48, [30.0, 25.0], [0.1, 0.1])]
    rows = results_table(results, base)
    assert [(r["trial"], r["best_t2v_r1"]) for r in rows] == [("bbbbb_00001", 30.0), ("aaaaa_00000", 20.0)]
    model = get_task(base).build_model(base, load_backbone(base.backbone, device="meta"))  # width 32
    assert rows[0]["trainable_params"] > sum(p.numel() for p in model.method.parameters() if p.requires_grad) > 0
    write_outputs(rows, tmp_path, base)
    assert read_rows(tmp_path)[0]["best_t2v_r1"] == "30.0"
    best = (tmp_path / "best.yaml").read_text()
    assert best.startswith("# Best trial bbbbb_00001") and "(t2v_r1 30.0000)" in best
    assert yaml.safe_load(best)["method"]["side_width"] == 48


def test_plan_counts_trials_and_admits_only_what_the_cluster_holds(capsys):
    assert count_trials(load_space("bottleneck", "side4video"), num_samples=4) == 16  # 4 widths x 4 samples
    two_cpu_workers = tiny_cfg("side4video", "train.num_workers=2", "train.cpus_per_worker=1")
    # 2 CPUs: both go to the workers, so the driver needs the custom resource (a local sweep cluster declares it).
    assert plan_sweep([{"CPU": 2.0, DRIVER_RESOURCE: 1.0}], two_cpu_workers, 16, None).concurrency == 1
    assert plan_sweep([{"CPU": 5.0}], two_cpu_workers, 16, None).concurrency == 2  # 2 x (2 + 0.01) <= 5
    assert plan_sweep([{"CPU": 4.0}], two_cpu_workers, 16, None).concurrency == 1  # 2 x 2.01 > 4: no deadlock
    assert plan_sweep([{"CPU": 64.0}], two_cpu_workers, 3, None).concurrency == 3  # never more than the trials
    # GPU workers are placed node by node: 3-GPU trials on two 4-GPU nodes fit twice, not 8 // 3 = 2.67 -> 2 by luck.
    gpu = tiny_cfg("side4video", "train.num_workers=3", "train.cpus_per_worker=2", "train.use_gpu=true")
    nodes = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}, {"CPU": 4.0, DRIVER_RESOURCE: 1.0}]
    plan = plan_sweep(nodes, gpu, 16, None)
    assert (plan.concurrency, plan.driver, plan.worker) == (2, {DRIVER_RESOURCE: 0.01}, {"CPU": 2.0, "GPU": 1.0})
    assert "16 trials, 2 at a time; each trial: 3 workers x (CPU 2, GPU 1)" in plan.describe()
    # An explicit --max-concurrent above what fits is clamped, with a warning; below, it is kept.
    assert plan_sweep(nodes, gpu, 16, 8).concurrency == 2
    assert "--max-concurrent 8 clamped to 2" in capsys.readouterr().err
    assert plan_sweep(nodes, gpu, 16, 1).concurrency == 1
    with pytest.raises(ConfigError, match=r"a trial needs 3 workers x \(CPU 2, GPU 1\).*cluster has CPU 4, GPU 2"):
        plan_sweep([{"CPU": 4.0, "GPU": 2.0}], gpu, 16, None)


def test_sampled_configurations_group_into_cohorts_of_compatible_members():
    space = load_space("bottleneck", "side4video")  # 4 widths x log-uniform lr
    configs = sample_configs(space, num_samples=2, seed=0)
    assert len(configs) == count_trials(space, 2) == 8 and configs == sample_configs(space, num_samples=2, seed=0)
    assert [len(c) for c in group_cohorts(configs, 3)] == [3, 3, 2]
    mixed = [{"method.side_width": w, "data.frames": f} for f in (8, 16) for w in (64, 128, 256)]
    cohorts = group_cohorts(mixed, 4)  # data.frames is not a member key: 8- and 16-frame configs never mix
    assert [[c["data.frames"] for c in g] for g in cohorts] == [[8, 8, 8], [16, 16, 16]]


def test_a_trial_bigger_than_the_cluster_is_refused_before_the_sweep(shards, ray_cluster, tmp_path, capsys):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    space = write_space(tmp_path, [16], [1e-3])
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--out", str(tmp_path / "sweep"), "--set"]
    assert sweep_main([*argv, *settings(shards), "--trial-set", f"train.num_workers={cpus + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"a trial needs {cpus + 1} workers x (CPU 1)" in err and f"cluster has CPU {cpus}" in err
    assert "Traceback" not in err and not (tmp_path / "sweep" / "tune").exists()


def test_a_relative_out_is_refused_on_a_cluster(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", "bottleneck", "--out", "runs/sweep"]
    assert sweep_main(argv) == 2
    assert "--out: 'runs/sweep' is relative" in capsys.readouterr().err
    assert sweep_main(argv[:-2]) == 2  # the default --out is relative too


def test_asha_sweep_writes_table_best_config_and_plot_and_best_retrains(shards, ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    space = write_space(tmp_path, [16, 32], [3e-3])  # two trials (the 2 x 2 grid: the cohort sweep test)
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--scheduler", "asha", "--out", str(out)]
    assert sweep_main([*argv, "--set", *settings(shards), "--trial-set", "train.epochs=2"]) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {(r["method.side_width"], r["train.lr"]) for r in rows} == {("16", "0.003"), ("32", "0.003")}
    for r in rows:
        assert 0 <= float(r["best_val_top1"]) <= 1 and float(r["peak_mem_mb"]) > 0 and int(r["trainable_params"]) > 0
        assert 1 <= int(r["epochs"]) <= 2  # ASHA may stop a trial after its first epoch
    assert "| trial | status |" in (out / "results.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert (best["method"]["side_width"], best["train"]["lr"]) == (
        int(rows[0]["method.side_width"]),
        float(rows[0]["train.lr"]),
    )
    assert best["train"]["epochs"] == 4  # --trial-set shortened the trials only; best.yaml keeps the config's length
    # The best config is a ready-to-run experiment.
    assert (
        i2v_main(["train", str(out / "best.yaml"), "train.epochs=1", "--out", str(tmp_path / "best"), "--no-progress"])
        == 0
    )
    assert (tmp_path / "best" / "summary.json").is_file()


def test_a_cohort_sweep_writes_one_row_per_configuration(shards, ray_cluster, tmp_path):
    """The 4 configurations of a 2 x 2 space as one cohort trial: the same table, best config and plot as a plain
    sweep (plus the cohort column), and ASHA's rung after epoch 1 halves the members inside the cohort."""
    out = tmp_path / "sweep"
    space = write_space(tmp_path, [16, 32], [1e-3, 3e-3])
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--scheduler", "asha", "--cohort", "4"]
    assert sweep_main([*argv, "--out", str(out), "--set", *settings(shards), "--trial-set", "train.epochs=2"]) == 0
    rows = read_rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"} and len({r["cohort"] for r in rows}) == 1
    assert {(r["method.side_width"], r["train.lr"]) for r in rows} == {
        (w, lr) for w in ("16", "32") for lr in ("0.001", "0.003")
    }
    assert list(rows[0]) == [
        "trial", "cohort", "status", "method.side_width", "train.lr", "best_val_top1", "epochs", "peak_mem_mb",
        "train_clips_per_s", "trainable_params", "error",
    ]  # fmt: skip
    assert sorted(int(r["epochs"]) for r in rows) == [1, 1, 2, 2]  # 2 of 4 stopped at the rung after epoch 1
    assert len({r["trainable_params"] for r in rows}) == 2  # two widths
    assert "saw the same clips" in (out / "results.md").read_text() and (out / "sweep.png").stat().st_size > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert (best["method"]["side_width"], best["train"]["lr"]) == (
        int(rows[0]["method.side_width"]),
        float(rows[0]["train.lr"]),
    )
    assert best["train"]["cohort"] == []  # a ready-to-run single experiment


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on_and_resumes(shards, ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    space = write_space(tmp_path, [16, 24], [1e-3])  # 24 is not a multiple of side_head_dim=16: that trial raises
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--scheduler", "fifo", "--out", str(out)]
    argv += ["--set", *settings(shards), "--trial-set", "train.epochs=1"]
    assert sweep_main(argv) == 0
    rows = {r["method.side_width"]: r for r in read_rows(out)}
    assert rows["16"]["status"] == "ok" and rows["24"]["status"] == "failed"
    assert "side_width: 24 must be a multiple of method.side_head_dim=16" in rows["24"]["error"]
    assert yaml.safe_load((out / "best.yaml").read_text())["method"]["side_width"] == 16
    # Running the same sweep again restores it (Tuner.restore) instead of starting over.
    capsys.readouterr()
    assert sweep_main(argv) == 0
    assert "resuming the interrupted sweep" in capsys.readouterr().out
    assert len(read_rows(out)) == 2


def test_ctrl_c_writes_what_finished_and_the_rerun_resumes(shards, ray_cluster, tmp_path, capsys):
    """The sweep runs in a subprocess attached to the test cluster; Ctrl-C (SIGINT to its process group, as a terminal
    sends it) once the first of two trials has finished."""
    import ray

    out = tmp_path / "sweep"
    space = write_space(tmp_path, [16, 32], [1e-3])
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--scheduler", "fifo", "--max-concurrent", "1"]
    argv += ["--out", str(out), "--set", *settings(shards), "--trial-set", "train.epochs=1"]
    env = os.environ | {
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tune.sweep", *argv],
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        log = ""
        for line in proc.stdout:  # Tune's own line for a finished trial (summary.json comes before Tune knows)
            log += line
            if "completed after" in line:
                break
        assert proc.poll() is None, log[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        log += proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, log[-3000:]
    assert "1 of 2 trials not finished; run the same command again to resume" in log
    status = [r["status"] for r in read_rows(out)]  # the second trial: stopped mid-run, or not generated yet
    assert status.count("ok") == 1 and set(status) <= {"ok", "unfinished"}, status
    assert (out / "results.md").is_file() and (out / "best.yaml").is_file()
    capsys.readouterr()
    assert sweep_main(argv) == 0  # attached to the same cluster, in this process
    assert "resuming the interrupted sweep" in capsys.readouterr().out
    assert [r["status"] for r in read_rows(out)] == ["ok"] * 2
