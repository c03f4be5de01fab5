from __future__ import annotations

import json

from conftest import TINY_VIT

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
