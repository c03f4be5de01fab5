from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import TINY_EVA, TINY_VIT
from safetensors.torch import save_file

from i2v.backbone import load_backbone, resolve_pretrained
from i2v.config import BackboneCfg


def test_contract_matches_open_clip_and_stops_early():
    bb = load_backbone(BackboneCfg(name=TINY_VIT))
    video = torch.randn(2, 3, 3, 32, 32)
    ran = []
    for i, blk in enumerate(bb.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    patches, prefix = bb(video, [0, 2])
    assert ran == [0, 1, 2]  # block 3 is never executed
    assert [p.shape for p in patches] == [(2, 3, 16, 64)] * 2 and [c.shape for c in prefix] == [(2, 3, 1, 64)] * 2
    ref = bb.visual.forward_intermediates(
        video.flatten(0, 1), indices=[0, 2], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
    )
    torch.testing.assert_close(patches[1].flatten(0, 1), ref["image_intermediates"][1])
    torch.testing.assert_close(prefix[0].flatten(0, 1), ref["image_intermediates_prefix"][0])
    # timm index semantics: int n = last n, negatives from the end
    assert bb.take_indices(2) == [2, 3] and bb.take_indices([-1]) == [3] and bb.take_indices(None) == [0, 1, 2, 3]


def test_freeze_is_idempotent_and_survives_train():
    bb = load_backbone(BackboneCfg(name=TINY_VIT))
    bb.freeze().freeze()
    bb.train()
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.visual.training
    bb.unfreeze()
    assert all(p.requires_grad for p in bb.parameters()) and bb.visual.training


def test_timm_tower_has_the_same_contract():
    bb = load_backbone(BackboneCfg(name=TINY_EVA))
    assert not bb.is_native and bb.width == 192 and len(bb.blocks) == 12
    patches, prefix = bb(torch.randn(1, 2, 3, 224, 224), [-1])
    assert patches[0].shape == (1, 2, 256, 192) and prefix[0].shape == (1, 2, 1, 192)


def test_vit_e_on_meta_allocates_nothing():
    bb = load_backbone(BackboneCfg(name="EVA02-E-14"), device="meta")
    n = sum(p.numel() for p in bb.parameters())
    assert 4.30e9 < n < 4.40e9, n
    assert all(p.is_meta for p in bb.parameters())
    assert (bb.width, len(bb.blocks), bb.grid_size) == (1792, 64, (16, 16))


@pytest.mark.parametrize("layout", ["full_clip.pt", "visual_only.safetensors", "visual_only.bin"])
def test_local_checkpoints_load(tmp_path, layout):
    src = load_backbone(BackboneCfg(name=TINY_VIT))
    sd = src.visual.state_dict()
    path = tmp_path / layout
    if layout.startswith("full"):
        torch.save({"state_dict": {f"visual.{k}": v for k, v in sd.items()} | {"logit_scale": torch.tensor(1.0)}}, path)
    elif layout.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    torch.manual_seed(1)
    dst = load_backbone(BackboneCfg(name=TINY_VIT, pretrained=str(path)))
    for k, v in dst.visual.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_bad_checkpoints_and_tags_fail_loudly(tmp_path, monkeypatch):
    path = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone(BackboneCfg(name=TINY_VIT, pretrained=str(path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained("ViT-B-16", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="known tags: .*openai"):
        resolve_pretrained("ViT-B-16", "not_a_tag")

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="Offline machines need a local file.*backbone.pretrained=/path/to"):
        resolve_pretrained("ViT-B-16", "openai")


def test_unknown_backbone_names_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="neither an open_clip model"):
        load_backbone(BackboneCfg(name="ViT-Q-99"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(BackboneCfg(name=str(tmp_path / "missing.json")))


def test_input_normalisation_follows_the_pretrained_tag():
    from i2v.backbone import image_norm

    assert image_norm("ViT-B-16-SigLIP", "webli") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert image_norm("ViT-B-16", "openai")[0] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert image_norm(TINY_VIT, None)[1] == tuple(open_clip.OPENAI_DATASET_STD)
