from __future__ import annotations

import json

import pytest
from conftest import ROOT, TINY_VIT, tiny_cfg

from i2v.cli import main


def test_describe_writes_json_with_the_documented_keys(tmp_path, capsys):
    path = tmp_path / "d.json"
    args = ["describe", "--method", "st_adapter", "--backbone", TINY_VIT, "--frames", "4", "--num-classes", "5"]
    assert main([*args, "--set", "method.bottleneck=16", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    assert {"trainable_params", "frozen_params", "total_params", "gflops"} <= set(d)
    assert d["trainable_params"] + d["frozen_params"] == d["total_params"] and d["gflops"] > 0
    assert "st_adapter" in capsys.readouterr().out


def test_describe_all_methods_and_vit_e_without_weights(tmp_path):
    path = tmp_path / "all.json"
    assert main(["describe", "--method", "all", "--backbone", TINY_VIT, "--frames", "4", "--json", str(path)]) == 0
    assert len(json.loads(path.read_text())) == 6
    assert main(["describe", "--method", "side4video", "--backbone", "EVA02-E-14", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["frozen_params"] == 4_350_556_928


def test_list_methods_and_errors(capsys):
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("side4video", "m_adapter", "st_adapter", "zeroi2v", "linear_probe", "full_finetune"))
    assert main(["describe", "--method", "st_adapter", "--set", "method.bottleneck=wide"]) == 2
    assert "method.bottleneck: expected int, got 'wide'" in capsys.readouterr().err


def test_tune_subcommand_is_tune_sweep(capsys):
    assert main(["tune", "--help"]) == 0  # a subprocess running `python -m tune.sweep --help`


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["data", "synth", "--out", "{tmp}/s", "--classes", "a"],
            "unknown synthetic class 'a'; choose from ['move_right'",
        ),
        (["train", "{tmp}/none.yaml"], "none.yaml: config file not found"),
        (["train", str(ROOT / "configs/smoke.yaml"), "--out", "{tmp}/r", "method.name=nope"], "unknown method 'nope'"),
        (["eval", "--checkpoint", "{tmp}/none.pt"], "--checkpoint: "),
        (["export", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/m.safetensors"], "--checkpoint: "),
        (["describe", "--method", "nope"], "method.name: unknown method 'nope'; choose one of"),
        (["data", "pack", "--ssv2-json", "{tmp}/a.json", "--out", "{tmp}/p"], "--ssv2-json needs --ssv2-labels"),
    ],
)
def test_bad_input_is_one_error_line_with_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2  # not SystemExit from argparse: `KEY=VALUE` after --out is an override
    err = capsys.readouterr().err
    assert err.startswith("i2v: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises((ValueError, FileNotFoundError)):  # --verbose: the traceback, for bug reports
        main(["--verbose", *argv])


def test_quiet_by_default_verbose_on_request(tmp_path):
    """Ray Train's per-report INFO lines and the workers' warnings filters follow --verbose (workers get the flag)."""
    from i2v.train.driver import make_trainer
    from i2v.train.loop import epoch_line

    quiet, loud = (make_trainer(tiny_cfg("side4video"), tmp_path / "r", verbose=v) for v in (False, True))
    assert quiet.run_config.logging_config.log_level == "WARNING" and not quiet.train_loop_config["verbose"]
    assert loud.run_config.logging_config.log_level == "INFO" and loud.train_loop_config["verbose"]
    m = {"epoch": 2, "loss": 0.61234, "train_top1": 0.7, "val_top1": 0.875, "train_clips_per_s": 41.52}
    line = epoch_line(m | {"peak_mem_mb": 1299.4, "skipped": 0}, epochs=4)
    assert line == "epoch 2/4  loss 0.6123  train top-1 0.7000  val top-1 0.8750  41.5 clips/s  peak 1299 MB"
