"""Shard paths as users pass them: an `i2v data pack` output directory means all of its shards, globs expand, and a
local path that matches nothing is an error naming it, at every entry point (loaders, stats, validate; eval and
predict are in test_eval_export.py)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_cfg
from data_fixtures import packed_stamps

from i2v.cli import main
from i2v.config import ConfigError, DataCfg
from i2v.data import build_eval_loader, build_train_loader, count_samples, expand_shards, read_label_map


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    packed_stamps(root, 6, shard_samples=2)  # root/shards/shard-00000{0,1,2}.tar + labels.json + index.json
    return root / "shards"


def test_expand_shards_resolves_pack_directories_globs_and_lists(packed, tmp_path):
    urls = [str(packed / f"shard-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(packed)) == urls == expand_shards(str(packed / "shard-{000000..000002}.tar"))
    assert expand_shards(str(packed / "shard-*.tar")) == urls
    assert expand_shards(f"{packed}::{urls[0]}") == [*urls, urls[0]]
    assert expand_shards(f"file://{urls[1]}") == [f"file://{urls[1]}"]
    assert expand_shards("s3://bucket/k400/shard-{0..1}.tar") == [
        "s3://bucket/k400/shard-0.tar",
        "s3://bucket/k400/shard-1.tar",
    ]
    # a directory means its index's order
    other = tmp_path / "reordered"
    other.mkdir()
    index = json.loads((packed / "index.json").read_text())
    index["shards"] = dict(reversed(index["shards"].items()))
    (other / "index.json").write_text(json.dumps(index))
    for name in index["shards"]:
        (other / name).write_bytes((packed / name).read_bytes())
    assert expand_shards(str(other)) == [str(other / f"shard-{i:06d}.tar") for i in (2, 1, 0)]


@pytest.mark.parametrize(
    "name, needle",
    [
        ("nowhere", "1 of 1 shards do not exist, e.g. {tmp}/nowhere"),
        ("nowhere/shard-{000000..000003}.tar", "4 of 4 shards do not exist, e.g. {tmp}/nowhere/shard-000000.tar"),
        ("shard-*.tar", "{tmp}/shard-*.tar: no file matches"),
        ("", "{tmp}/: a directory without index.json"),
    ],
)
def test_a_path_that_matches_nothing_is_an_error_naming_it(tmp_path, name, needle):
    with pytest.raises(FileNotFoundError) as e:
        expand_shards(f"{tmp_path}/{name}")
    assert needle.format(tmp=tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="do not exist|no file matches|without index.json"):
        build_eval_loader(DataCfg(val_shards=f"{tmp_path}/{name}", num_workers=0))


def test_loaders_and_the_index_read_a_pack_directory(packed):
    cfg = DataCfg(
        train_shards=str(packed),
        val_shards=str(packed),
        frames=4,
        size=32,
        batch_size=4,
        num_workers=0,
        num_classes=3,
        epoch_clips=8,
    )
    assert count_samples(str(packed)) == 6 and read_label_map(str(packed)) == ["class0", "class1", "class2"]
    assert [len(label) for _, label in build_train_loader(cfg)] == [4, 4]  # today's main: IsADirectoryError, runs dry
    keys = [k for *_, keys in build_eval_loader(cfg, with_keys=True) for k in keys]
    assert len(keys) == len(set(keys)) == 6


def test_data_stats_on_a_pack_directory(packed, tmp_path, capsys):
    report = tmp_path / "stats.json"
    assert main(["data", "stats", str(packed), "--frames", "4", "--size", "32", "--json", str(report)]) == 0
    stats = json.loads(report.read_text())
    assert stats["clips"] == 6 and stats["skipped"] == 0 and sum(stats["labels"].values()) == 6
    assert main(["data", "stats", str(tmp_path / "typo")]) == 2
    assert f"1 of 1 shards do not exist, e.g. {tmp_path / 'typo'}" in capsys.readouterr().err


def test_validate_accepts_pack_directories_and_names_the_key_of_a_missing_path(packed, tmp_path):
    from i2v.train.driver import validate

    shards = [f"data.train_shards={packed}", f"data.val_shards={packed}"]
    validate(tiny_cfg("linear_probe", *shards, num_classes=3))
    with pytest.raises(ConfigError, match=r"data.val_shards: .*typo: a directory without index.json"):
        (tmp_path / "typo").mkdir()
        validate(tiny_cfg("linear_probe", shards[0], f"data.val_shards={tmp_path / 'typo'}", num_classes=3))
    with pytest.raises(ConfigError, match=r"data.train_shards: 1 of 1 shards do not exist"):
        validate(tiny_cfg("linear_probe", f"data.train_shards={tmp_path / 'none'}", num_classes=3))
