"""Each experiment config holds the reference values shared/RECIPES.md lists for the recipe it claims, and
docs/recipes.md is what `python -m i2v.recipes` makes of the configs today."""

from __future__ import annotations

import pytest
from conftest import ROOT

from i2v import recipes
from i2v.config import load_config

RA = "rand-m7-n4-mstd0.5-inc1"
SSV2_SWAPS = [
    ["Pulling something from left to right", "Pulling something from right to left"],
    ["Pushing something from left to right", "Pushing something from right to left"],
    ["Turning the camera left while filming something", "Turning the camera right while filming something"],
]
Z_EXEMPT = [
    "*class_embedding*",
    "*positional_embedding*",
    "*temporal_embedding*",
    "*absolute_pos_embed*",
    "*ln_1*",
    "*ln_2*",
    "*ln_pre*",
    "*ln_post*",
]

# Values shared by every setting of a method (RECIPES.md sections 1-3), then per config. "videos" = clips per GPU
# before repeated augmentation; "gpus" = train.num_workers.
S4V = {
    "data.frames": 8,
    "data.size": 224,
    "data.flip": True,
    "data.resize_interpolation": "bicubic",
    "data.random_erasing": 0.0,
    "data.test_crops": 3,
    "data.test_crop_offsets": "full_res",
    "train.label_smoothing": 0.1,
    "train.weight_decay": 0.15,
    "train.wd_exempt": [],
    "train.warmup_start": 0.0,
    "train.schedule": "cosine",
    "train.grad_clip": 0.0,
    "train.accum_steps": 1,
    "train.lr_mult": {},
    "train.num_workers": 8,
    "method.head_dropout": 0.0,
}
S4V_K400 = {
    **S4V,
    "data.train_resize": [256],
    "data.test_resize": [256],
    "data.grayscale_p": 0.2,
    "data.num_repeats": 1,
    "data.test_clips": 4,
    "data.flip_label_pairs": [],
    "data.num_classes": 400,
}
S4V_SSV = {
    **S4V,
    "data.train_resize": [256, 320],
    "data.test_resize": [256, 320],
    "data.grayscale_p": 0.0,
    "data.num_repeats": 2,
    "data.test_clips": 2,
    "data.flip_label_pairs": SSV2_SWAPS,
    "data.randaugment": RA,
    "data.randaugment_at": "before_resize",
    "data.num_classes": 174,
}
ST = {
    "data.frames": 8,
    "data.size": 224,
    "data.resize_interpolation": "bicubic",
    "train.label_smoothing": 0.0,
    "train.weight_decay": 0.01,
    "train.wd_exempt": ["*.bias"],
    "train.warmup_epochs": 2.0,
    "train.warmup_start": 0.0,
    "train.schedule": "cosine",
    "train.grad_clip": 0.0,
    "method.head_dropout": 0.5,
}
Z = {
    "data.size": 224,
    "data.train_resize": [256],
    "data.flip": True,
    "data.randaugment": RA,
    "data.test_resize": None,
    "train.lr": 3e-4,
    "train.weight_decay": 0.05,
    "train.wd_exempt": Z_EXEMPT,
    "train.warmup_epochs": 2.5,
    "train.warmup_start": 0.1,
    "train.schedule": "cosine_epoch",
    "train.grad_clip": 0.0,
    "method.head_dropout": 0.5,
}
Z_K400 = {
    **Z,
    "data.sampler": "dense",
    "data.randaugment_at": "before_crop",
    "data.flip_label_pairs": [],
    "data.test_crops": 1,
    "data.test_clips": 3,
    "train.label_smoothing": 0.0,
    "train.epochs": 40,
    "method.adapter_scale": 0.5,
    "method.adapter_dropout": 0.1,
}
Z_SSV2 = {
    **Z,
    "data.sampler": "segment",
    "data.randaugment_at": "after_flip",
    "data.flip_label_pairs": SSV2_SWAPS,
    "data.random_erasing": 0.25,
    "data.random_erasing_mode": "const",
    "data.test_crops": 3,
    "data.test_clips": 1,
    "train.label_smoothing": 0.1,
    "train.epochs": 50,
}
Z_SMALL = {**Z_K400, "data.sampler": "segment", "data.frames": 8, "data.batch_size": 16, "data.test_crops": 3}
Z_SMALL.update({"data.test_clips": 1, "train.lr_mult": {}})
HEAD_FULL_REST_TENTH = {"head.*": 1.0, "*": 0.1}  # ZeroI2V L/14: `backbone` x 0.1, cls_head x 1

EXPECTED = {
    "side4video_vit-b16-openai_1x8xb32-f8_k400": {
        **S4V_K400,
        "data.batch_size": 32,
        "data.randaugment": None,
        "train.lr": 1e-3,
        "train.epochs": 30,
        "train.warmup_epochs": 4.0,
        "method.side_width": 320,
    },
    "side4video_vit-l14-openai_1x8xb32-f8_k400": {
        **S4V_K400,
        "data.batch_size": 32,
        "data.randaugment": None,
        "train.lr": 1e-4,
        "train.epochs": 30,
        "train.warmup_epochs": 4.0,
        "method.side_width": 512,
    },
    "side4video_eva02-e14-laion2b_1x8xb1-f8_k400": {
        **S4V_K400,
        "data.batch_size": 1,
        "data.randaugment": RA,
        "data.randaugment_at": "before_resize",
        "train.lr": 1e-4,
        "train.epochs": 20,
        "train.warmup_epochs": 4.0,
        "method.side_width": 576,
        "method.tap_order": "linear_norm",
    },
    "side4video_vit-b16-openai_1x8xb16-f8_ssv2": {
        **S4V_SSV,
        "data.batch_size": 32,
        "train.lr": 1e-3,
        "train.epochs": 30,
        "train.warmup_epochs": 4.0,
    },
    "side4video_vit-l14-openai_1x8xb16-f8_ssv2": {
        **S4V_SSV,
        "data.batch_size": 32,
        "train.lr": 1e-4,
        "train.epochs": 30,
        "train.warmup_epochs": 4.0,
    },
    "side4video_eva02-e14-laion2b_1x8xb8-f8_ssv2": {
        **S4V_SSV,
        "data.batch_size": 16,
        "train.lr": 1e-4,
        "train.epochs": 25,
        "train.warmup_epochs": 6.0,
    },
    "side4video_vit-b16-openai_1x8xb16-f8_ssv1": {
        **S4V_SSV,
        "data.batch_size": 32,
        "train.lr": 1e-3,
        "train.epochs": 40,
        "train.warmup_epochs": 4.0,
    },
    "side4video_vit-l14-openai_1x8xb16-f8_ssv1": {
        **S4V_SSV,
        "data.batch_size": 32,
        "train.lr": 1e-4,
        "train.epochs": 30,
        "train.warmup_epochs": 4.0,
    },
    "side4video_eva02-e14-laion2b_1x8xb8-f8_ssv1": {
        **S4V_SSV,
        "data.batch_size": 16,
        "train.lr": 1e-4,
        "train.epochs": 30,
        "train.warmup_epochs": 6.0,
    },
    "st_adapter_vit-b16-openai_1x3xb64-f8_k400": {
        **ST,
        "data.sampler": "dense",
        "data.stride": 16,
        "data.batch_size": 64,
        "train.num_workers": 3,
        "data.short_side_jitter": [224, 258],
        "data.flip": True,
        "data.randaugment": None,
        "data.test_resize": None,
        "data.test_crops": 1,
        "data.test_clips": 3,
        "train.lr": 7.5e-4,
        "train.epochs": 12,
        "method.position": "pre_mlp",
        "method.bottleneck": 384,
    },
    "st_adapter_vit-b16-openai_1x4xb64-f8_ssv2": {
        **ST,
        "data.sampler": "segment",
        "data.batch_size": 64,
        "train.num_workers": 4,
        "data.short_side_jitter": None,
        "data.scale": [0.08, 1.0],
        "data.crop_interpolation": "bicubic",
        "data.flip": False,
        "data.randaugment": RA,
        "data.randaugment_at": "before_resize",
        "data.test_crops": 3,
        "data.test_clips": 1,
        "train.lr": 1e-3,
        "train.epochs": 50,
        "method.position": "both",
        "method.bottleneck": 384,
    },
    "zeroi2v_vit-b16-openai_1x8xb8-f8_k400": {
        **Z_K400,
        "data.frames": 8,
        "data.stride": 16,
        "data.batch_size": 8,
        "train.lr_mult": {},
        "method.stdha_offsets": [-1, 1],
    },
    "zeroi2v_vit-l14-openai_1x8xb8-f8_k400": {
        **Z_K400,
        "data.frames": 8,
        "data.stride": 16,
        "data.batch_size": 8,
        "train.lr_mult": HEAD_FULL_REST_TENTH,
    },
    "zeroi2v_vit-l14-openai_1x8xb2-f32_k400": {
        **Z_K400,
        "data.frames": 32,
        "data.stride": 4,
        "data.batch_size": 2,
        "train.accum_steps": 2,
        "train.lr": 1.5e-4,  # Z-d with 8 GPUs (ambiguous; the header says so)
        "train.lr_mult": HEAD_FULL_REST_TENTH,
        "data.random_erasing": 0.25,
        "data.random_erasing_mode": "rand",
    },
    "zeroi2v_vit-b16-openai_1x8xb4-f16_ssv2": {
        **Z_SSV2,
        "data.frames": 16,
        "data.batch_size": 4,
        "train.lr_mult": {},
        "method.adapter_scale": 1.0,
        "method.adapter_dropout": 0.0,
    },
    "zeroi2v_vit-l14-openai_1x8xb2-f32_ssv2": {
        **Z_SSV2,
        "data.frames": 32,
        "data.batch_size": 2,
        "train.accum_steps": 2,
        "train.lr": 1.5e-4,  # Z-d with 8 GPUs (ambiguous; the header says so)
        "train.lr_mult": HEAD_FULL_REST_TENTH,
        "method.adapter_scale": 1.0,
        "method.adapter_dropout": 0.1,
    },
    "zeroi2v_vit-b16-openai_1x8xb16-f8_hmdb51": {**Z_SMALL, "data.num_classes": 51},
    "zeroi2v_vit-b16-openai_1x8xb16-f8_ucf101": {**Z_SMALL, "data.num_classes": 101},
    "zeroi2v_vit-b16-openai_1x8xb16-f32_hmdb51": {
        **Z_SMALL,
        "data.frames": 32,
        "data.num_classes": 51,
        "data.test_clips": 2,
    },
    "zeroi2v_vit-b16-openai_1x8xb16-f32_ucf101": {**Z_SMALL, "data.frames": 32, "data.num_classes": 101},
}
# Side4Video Retrieval/script_train/run_train_*.sh (shared/RETRIEVAL_FEWSHOT.md section 1.6)
S4V_RETRIEVAL = {
    "task": "retrieval",
    "method.side_width": 320,
    "method.cls_pos": True,
    "data.frames": 12,
    "data.batch_size": 16,
    "data.flip": False,
    "train.num_workers": 8,
    "train.lr": 1e-4,
    "train.epochs": 5,
    "train.warmup_epochs": 0.5,
    "train.weight_decay": 0.2,
    "train.wd_exempt": ["*bias"],
    "train.grad_clip": 1.0,
    "retrieval.clip_train": "low_lr",
    "retrieval.coef_lr": 1e-3,
    "retrieval.max_words": 32,
    "retrieval.interaction": "wti",
}
for _name, _bb, _eval_batch in (
    ("side4video_vit-b16-openai_1x8xb16-f12_msrvtt", "ViT-B-16", 16),
    ("side4video_vit-b16-openai_1x8xb16-f12_msvd", "ViT-B-16", 16),
    ("side4video_vit-b16-openai_1x8xb16-f12_vatex", "ViT-B-16", 64),
    ("side4video_vit-b32-openai_1x8xb16-f12_msrvtt", "ViT-B-32", 16),
):
    EXPECTED[_name] = S4V_RETRIEVAL | {"backbone.name": _bb, "data.eval_batch_size": _eval_batch}

NO_REFERENCE = {  # configs without a released reference recipe: their headers say so
    "st_adapter_vit-l14-openai_1x8xb32-f8_k400",
    "st_adapter_vit-l14-openai_1x8xb16-f8_ssv2",
    "m_adapter_vit-b16-openai_1x8xb32-f8_k400",
    "m_adapter_vit-l14-openai_1x8xb16-f8_ssv2",
    "full_finetune_vit-l14-openai_1x8xb16-f8_k400",
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_experiment_config_is_in_the_table():
    stems = {p.stem for p in recipes.EXPERIMENTS.glob("*.yaml")}
    fewshot = {s for s in stems if "_fewshot-" in s}  # a protocol's grid (tune/fewshot.py), not a paper's recipe
    assert stems == set(EXPECTED) | NO_REFERENCE | fewshot
    for stem in fewshot:  # they name the protocol they follow, never ZeroI2V's (whose parameters are unknown)
        assert "follows vifi-clip's few-shot protocol" in (recipes.EXPERIMENTS / f"{stem}.yaml").read_text().lower()


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_config_holds_the_reference_values(stem):
    cfg = load_config(recipes.EXPERIMENTS / f"{stem}.yaml")
    got = {key: _get(cfg, key) for key in EXPECTED[stem]}
    assert got == EXPECTED[stem]


@pytest.mark.parametrize("stem", sorted(NO_REFERENCE))
def test_configs_without_a_reference_say_so(stem):
    lines = (recipes.EXPERIMENTS / f"{stem}.yaml").read_text().lower().splitlines()
    text = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))  # the header, unwrapped
    assert any(w in text for w in ("no reference preset", "no public recipe", "starting point"))


def test_docs_recipes_md_is_up_to_date():
    assert (ROOT / "docs/recipes.md").read_text() == recipes.render(), "run: python -m i2v.recipes"
    assert recipes.main(["--check"]) == 0


def test_every_config_names_its_target():
    for path in recipes.EXPERIMENTS.glob("*.yaml"):
        assert {"top1", "gpus", "source"} <= set(recipes.target(path)), path.name


# Trainable parameters of the reference Side4Video modules (RECIPES.md section 1; B/16 K400 measured on CPU, the rest
# computed from the module definitions). The E/14 rows are the EVA variant: post-norm blocks and no post_bn.
SIDE4VIDEO_PARAMS = {
    "side4video_vit-b16-openai_1x8xb32-f8_k400": 21_185_232,
    "side4video_vit-l14-openai_1x8xb32-f8_k400": 102_224_784,
    "side4video_eva02-e14-laion2b_1x8xb1-f8_k400": 183_504_208,
    "side4video_vit-b16-openai_1x8xb16-f8_ssv2": 21_112_686,
    "side4video_vit-l14-openai_1x8xb16-f8_ssv2": 102_108_846,
    "side4video_eva02-e14-laion2b_1x8xb8-f8_ssv2": 183_373_806,
}


@pytest.mark.parametrize("stem", sorted(SIDE4VIDEO_PARAMS))
def test_side4video_parameter_counts_match_the_reference(stem):
    from i2v.methods import create_model

    model = create_model(load_config(recipes.EXPERIMENTS / f"{stem}.yaml"), device="meta")
    assert sum(p.numel() for p in model.trainable_parameters()) == SIDE4VIDEO_PARAMS[stem]


def test_eva_side_block_is_post_norm_and_trains():
    import torch
    from conftest import TINY_EVA, tiny_cfg

    from i2v.methods import create_model
    from i2v.methods.side4video import EVASideBlock, SideBlock

    cfg = tiny_cfg(
        "side4video", f"backbone.name={TINY_EVA}", "method.tap_order=linear_norm", "method.indices=2", frames=3
    )
    model = create_model(cfg)
    assert all(isinstance(b, EVASideBlock) for b in model.blocks) and isinstance(model.post_bn, torch.nn.Identity)
    block, clip_block = model.blocks[0], SideBlock(32, 2, model.grid, 3, 4.0, 2)
    assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in clip_block.parameters())
    # post-norm: with the branch outputs' norms zeroed (gamma = beta = 0) the block is the identity
    for norm in (block.bn_conv, block.ln_attn, block.bn_mlp):
        torch.nn.init.zeros_(norm.weight)
        torch.nn.init.zeros_(norm.bias)
    s, cls = torch.randn(2 * 3, model.grid[0] * model.grid[1], 32), torch.randn(2 * 3, 1, 32)
    torch.testing.assert_close(block(s, cls, model.pos, 3), s)
    video = torch.randn(1, 3, 3, *model.backbone.image_size)
    model(video).sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
