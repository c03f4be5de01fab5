"""Optimizer groups and schedules as the reference recipes set them: lr multipliers, weight-decay exemptions,
warm-up start factor, per-epoch cosine, layer decay and drop path for full fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_EVA, tiny_cfg

from i2v.config import ConfigError, TrainCfg, load_config
from i2v.methods import create_model
from i2v.train.optim import build_optimizer, cosine_lambda, param_groups


def _by_name(model, cfg):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg) for p in g["params"]}


def test_lr_mult_first_matching_pattern_wins():
    cfg = tiny_cfg("zeroi2v", "train.lr=1e-3", "train.lr_mult={head.*: 1.0, '*': 0.1}")
    groups = _by_name(create_model(cfg), cfg.train)
    assert groups["head.1.weight"][0] == pytest.approx(1e-3)
    assert groups["adapters.0.attn_in.down.weight"][0] == pytest.approx(1e-4)
    assert groups["temporal_embedding"][0] == pytest.approx(1e-4)
    opt = build_optimizer(create_model(cfg), cfg.train)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])


def test_weight_decay_exemptions_per_config():
    default = tiny_cfg("side4video", "train.weight_decay=0.15")
    model = create_model(default)
    assert _by_name(model, default.train)["blocks.0.bn_mlp.bias"][1] == 0.0  # 1-d rule
    assert _by_name(model, default.train)["pos"][1] == 0.0  # no_weight_decay()
    everything = load_config(None, ["train.weight_decay=0.15", "train.wd_exempt=[]"]).train
    assert {wd for _, wd in _by_name(model, everything).values()} == {0.15}  # Side4Video decays everything
    zero = tiny_cfg("zeroi2v", "train.wd_exempt=['*temporal_embedding*', '*ln_post*']")
    groups = _by_name(create_model(zero), zero.train)
    assert groups["temporal_embedding"][1] == groups["backbone.visual.ln_post.bias"][1] == 0.0
    assert groups["adapters.0.attn_in.down.bias"][1] == zero.train.weight_decay  # ZeroI2V decays biases


def test_grad_clip_is_off_by_default_and_dicts_are_validated():
    assert TrainCfg().grad_clip == 0.0
    with pytest.raises(ConfigError, match="train.lr_mult: expected a mapping"):
        load_config(None, ["train.lr_mult=[1]"])
    with pytest.raises(ConfigError, match=r"train.lr_mult.head: expected float"):
        load_config(None, ["train.lr_mult={head: x}"])


def test_warmup_start_and_per_epoch_cosine():
    fn = cosine_lambda(100, 25, warmup_start=0.1, schedule="cosine_epoch", steps_per_epoch=10)
    assert fn(0) == pytest.approx(0.1 + 0.9 / 25)  # mmengine LinearLR from 0.1 ...
    assert fn(24) == pytest.approx(math.cos(math.pi * 2 / 10) * 0.5 + 0.5)  # ... times the epoch-2 cosine
    assert fn(30) == fn(39) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))  # constant within an epoch
    it = cosine_lambda(100, 20, warmup_start=0.0)
    assert it(0) == pytest.approx(1 / 20) and it(20) == pytest.approx(1.0) and it(21) < it(20)


@pytest.mark.parametrize("tower", ["vit", "eva"])
def test_full_finetune_layer_decay_and_drop_path(tower):
    extra = [f"backbone.name={TINY_EVA}"] if tower == "eva" else []
    cfg = tiny_cfg("full_finetune", "method.layer_decay=0.5", "method.drop_path=0.3", *extra)
    model = create_model(cfg)
    scales = model.lr_scales()
    depth = len(model.backbone.blocks)
    assert scales["head.1.weight"] == 1.0
    first = next(n for n in scales if ".0." in n and "blocks" in n)
    last = next(n for n in scales if f".{depth - 1}." in n and "blocks" in n)
    assert scales[first] == 0.5**depth and scales[last] == 0.5
    assert min(scales.values()) == 0.5 ** (depth + 1)  # embeddings
    lrs = {g["lr"] for g in param_groups(model, cfg.train)}
    assert len(lrs) == depth + 2
    video = torch.randn(1, 2, 3, *model.backbone.image_size)
    model.train()
    torch.manual_seed(0)
    a = model.backbone(video, pooled=True)
    b = model.backbone(video, pooled=True)
    assert not torch.allclose(a, b)  # stochastic depth in training
    model.eval()
    assert torch.equal(model.backbone(video, pooled=True), model.backbone(video, pooled=True))
    with pytest.raises(ConfigError, match="layer_decay: 0.0 must be in"):
        tiny_cfg("full_finetune", "method.layer_decay=0")
