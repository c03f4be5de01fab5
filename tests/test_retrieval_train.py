"""A retrieval run end to end on Ray Train (2 CPU workers, the tiny CLIP, ZeRO-3 partitioned towers), then `i2v eval`
and `i2v search` on its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
from conftest import ROOT
from safetensors.torch import save_file
from test_retrieval import TINY_CLIP, make_captioned_shards

from i2v.cli import main
from i2v.config import load_config
from i2v.train.driver import run_training

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]
ROOT_SMOKE = str(ROOT / "configs/retrieval_smoke.yaml")


def test_retrieval_run_eval_and_search(tmp_path, capsys):
    train = make_captioned_shards(tmp_path / "train", 16, seed=0, per_shard=4)
    test = make_captioned_shards(tmp_path / "test", 8, seed=1, per_shard=4)
    open_clip.add_model_config(TINY_CLIP)  # "pretrained" towers: i2v eval must rebuild exactly the trained model
    weights = tmp_path / "clip.safetensors"
    save_file(
        {k: v.contiguous() for k, v in open_clip.create_model("i2v-tiny-clip").state_dict().items()}, str(weights)
    )
    cfg = load_config(
        ROOT_SMOKE,
        [
            f"backbone.name={TINY_CLIP}",
            f"backbone.pretrained={weights}",
            "backbone.quick_gelu=false",
            "backbone.partition=zero3",
            "backbone.zero3_persistence_threshold=0",
            f"data.train_shards={train}",
            f"data.val_shards={test}",
            "data.frames=4",
            "data.batch_size=4",
            "data.eval_batch_size=3",
            "data.num_workers=0",
            "train.epochs=2",
            "method.side_width=32",
            "method.side_head_dim=16",
            "retrieval.save_sim=true",
            "retrieval.interaction=wti",  # the reference's (the smoke config's mean is the simpler path)
            "train.lr_mult={}",  # the text tower trains too (the smoke config locks it)
        ],
    )
    out = tmp_path / "run"
    summary = run_training(cfg, out, progress=False)
    written = json.loads((out / "summary.json").read_text())
    keys = [f"{d}_{k}" for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "mdr", "mnr")]
    for key in (*keys, "chance_r1", "val_num_videos", "val_num_captions", "final_epoch", "best_epoch", "selected_on"):
        assert written[key] is not None, key
    assert written["chance_r1"] == 100 / 8 and written["val_num_videos"] == 8 and written["val_num_captions"] == 16
    assert written["final_epoch"]["epoch"] == 2 and written["best_epoch"]["epoch"] in (1, 2)
    assert written["best_epoch"]["t2v_r1"] >= written["final_epoch"]["t2v_r1"]
    assert summary["t2v_r1"] == written["t2v_r1"] and 1 <= written["t2v_mdr"] <= 8
    sim = np.load(out / "eval" / "sim_epoch_002.npy")  # retrieval.save_sim: the matrix of each epoch
    assert sim.shape == (16, 8) and np.isfinite(sim).all()
    assert len(json.loads((out / "eval" / "sim_video_ids.json").read_text())) == 8

    # i2v eval on the checkpoint (replicated model): the run's last evaluation (ZeRO-3 engine) up to near-ties of this
    # barely trained tiny model, i.e. one caption (T2V) or one video (V2T) either way
    assert main(["eval", "--checkpoint", summary["checkpoint"], "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["num_videos"] == 8 and evaluated["num_captions"] == 16
    for key in keys:
        if key.endswith(("r1", "r5", "r10")):
            assert abs(evaluated[key] - written[key]) <= 100 / (16 if key.startswith("t2v") else 8) + 1e-6, key
    # i2v search: features cached next to the checkpoint on the first query, read back on the second
    for cached in (False, True):
        assert (
            main(["search", "--checkpoint", summary["checkpoint"], "--videos", test, "a red square moving left"]) == 0
        )
        printed = capsys.readouterr()
        assert ("read from" in printed.err) == cached and printed.out.count("clip1_") == 5
