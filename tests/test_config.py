from __future__ import annotations

import pytest

from i2v.config import ConfigError, ExperimentCfg, Side4VideoCfg, STAdapterCfg, load_config


def test_defaults_round_trip_through_plain_dicts():
    cfg = load_config(None, ["method.name=zeroi2v", "method.stdha_offsets=[-1,1,-2,2]", "train.lr=3e-4"])
    d = cfg.to_dict()
    assert d["method"] == {**d["method"], "name": "zeroi2v", "stdha_offsets": [-1, 1, -2, 2]}
    assert ExperimentCfg.from_dict(d) == cfg
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method:\n  name: st_adapter\n  bottleneck: 128\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["method.position=both", "data.frames=16"])
    assert isinstance(cfg.method, STAdapterCfg)
    assert (cfg.method.bottleneck, cfg.method.position, cfg.data.frames, cfg.train.lr) == (128, "both", 16, 1e-3)


def test_switching_method_by_override_resets_the_method_section(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method:\n  name: st_adapter\n  bottleneck: 128\n")
    cfg = load_config(path, ["method.name=side4video", "method.side_width=64"])
    assert cfg.method == Side4VideoCfg(side_width=64)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.name=nope"], "method.name: unknown method 'nope'; choose one of ['full_finetune'"),
        (["method.name=st_adapter", "method.side_width=3"], "method.side_width: unknown key; allowed keys are"),
        (["method.name=st_adapter", "method.bottleneck=wide"], "method.bottleneck: expected int, got 'wide'"),
        (
            ["method.name=st_adapter", "method.position=middle"],
            "method.position: 'middle' is not allowed; choose one of",
        ),
        (["backbone.partition=zero2"], "['replicate', 'zero3']"),
        (["data.frames=true"], "data.frames: expected int, got True"),
        (["trian.lr=1"], "trian: unknown key; allowed keys are ['backbone', 'data', 'method', 'retrieval', 'task', "),
        (["train.lr"], "expected key=value"),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)
    assert "overrides" in str(e.value)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  frams: 8\n")
    with pytest.raises(ConfigError, match=rf"{path}.*data.frams: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.lr=1e-3", "train.lr=3e-4"], "train.lr"),
        (["train.lr=1e-3", " train . lr =3e-4"], "train.lr"),  # the same key, spelt with spaces
        # What bash makes of an unquoted brace pattern: one override per shard, the last one silently won.
        ([f"data.train_shards=/data/k400/train/shard-{i:06d}.tar" for i in range(240)], "data.train_shards"),
        (["method.name=st_adapter", "method.name=side4video"], "method.name"),
        (["data={frames: 16}", "data.frames=8"], "data.frames"),  # a section and its own key
        (["data.frames=8", "data={frames: 16}"], "data.frames"),
        (["method.name=st_adapter", "method={name: zeroi2v}"], "method.name"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^overrides: {key}: given twice \("):
        load_config(None, overrides)


def test_one_value_per_key_still_allows_the_method_switch_and_layered_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method:\n  name: st_adapter\n  bottleneck: 128\n")
    # method.name and other method keys are different keys (the switch resets the file's method section first).
    cfg = load_config(path, ["method.bottleneck=64", "method.name=zeroi2v", "data.frames=16"])
    assert (cfg.method.name, cfg.method.bottleneck, cfg.data.frames) == ("zeroi2v", 64, 16)
    # `defaults` sit under `overrides` (CLI flags under --set, --set under --trial-set): the override wins there.
    cfg = load_config(path, ["train.epochs=2"], defaults=["train.epochs=30", "train.lr=1e-4"])
    assert (cfg.train.epochs, cfg.train.lr) == (2, 1e-4)
    with pytest.raises(ConfigError, match="overrides: train.epochs: given twice"):
        load_config(path, [], defaults=["train.epochs=30", "train.epochs=3"])
