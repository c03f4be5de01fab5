"""Ray Tune sweeps (tune/): a 2 widths x 2 learning rates ASHA sweep on the synthetic benchmark, a sweep with a
failing trial, resuming a finished sweep, and re-training the best config with `i2v train`."""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import ROOT

from i2v.cli import main as i2v_main
from tune.spaces import load_space
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


def test_asha_sweep_writes_table_best_config_and_plot_and_best_retrains(shards, ray_cluster, tmp_path):
    out = tmp_path / "sweep"
    space = write_space(tmp_path, [16, 32], [1e-3, 3e-3])
    argv = [str(ROOT / "configs/smoke.yaml"), "--space", space, "--scheduler", "asha", "--out", str(out)]
    assert sweep_main([*argv, "--set", *settings(shards), "--trial-set", "train.epochs=2"]) == 0
    rows = read_rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["method.side_width"], r["train.lr"]) for r in rows} == {
        (w, lr) for w in ("16", "32") for lr in ("0.001", "0.003")
    }
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
