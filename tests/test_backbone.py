from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import TINY_EVA, TINY_VIT, ClipWrapper, tiny_cfg
from safetensors.torch import save_file

from i2v.backbone import VideoBackbone, load_backbone, resolve_backbone, resolve_pretrained
from i2v.config import BackboneCfg, ConfigError, load_config


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
    with pytest.raises(RuntimeError, match="Offline machines need a local file.*backbone.pretrained=/path/to") as e:
        resolve_pretrained("ViT-B-16", "openai")
    assert "backbone.quick_gelu=true backbone.mean=[0.48145466," in str(e.value)  # what OpenAI's weights need


def test_unknown_backbone_names_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="neither an open_clip model"):
        load_backbone(BackboneCfg(name="ViT-Q-99"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(BackboneCfg(name=str(tmp_path / "missing.json")))


def test_input_normalisation_follows_the_pretrained_tag_or_the_keys(tmp_path):
    def norm(name, pretrained=None, **keys):
        r = resolve_backbone(BackboneCfg(name=name, pretrained=pretrained, **keys), fetch=False)
        return r.mean, r.std

    assert norm("ViT-B-16-SigLIP", "webli") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert norm("ViT-B-16", "openai")[0] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert norm(TINY_VIT)[1] == tuple(open_clip.OPENAI_DATASET_STD)
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # e.g. a DINOv2 or ImageNet-21k tower
    assert norm("ViT-B-16-SigLIP", "webli", mean=imagenet[0], std=imagenet[1]) == tuple(map(tuple, imagenet))
    bb = load_backbone(BackboneCfg(name=TINY_VIT, mean=imagenet[0], std=imagenet[1]))
    assert (bb.mean, bb.std) == tuple(map(tuple, imagenet))
    for bad in ("backbone.mean=[0.5,0.5]", "backbone.std=[0.2,0.0,0.2]"):
        with pytest.raises(ConfigError, match=r"backbone\.(mean|std): .* must be 3 numbers"):
            load_config(None, [bad])


def _keyless(tmp_path) -> str:
    """The tiny ViT's model config without its "quick_gelu" key, like open_clip's own ViT-B-16.json."""
    cfg = json.loads(Path(TINY_VIT).read_text())
    del cfg["quick_gelu"]
    path = tmp_path / "i2v-tiny-vit-keyless.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _tower(name: str, quick_gelu: bool) -> VideoBackbone:
    torch.manual_seed(3)
    bb = load_backbone(BackboneCfg(name=name, quick_gelu=quick_gelu))
    with torch.no_grad():
        for p in bb.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return bb


def _features(bb: VideoBackbone) -> torch.Tensor:
    torch.manual_seed(4)
    patches, _ = bb(torch.randn(2, 2, 3, 32, 32), [-1])
    return torch.cat([patches[0].flatten(), bb(torch.randn(2, 2, 3, 32, 32), pooled=True).flatten()])


def test_quick_gelu_checkpoint_by_path_reproduces_its_tower_and_auto_never_guesses(tmp_path):
    name = _keyless(tmp_path)
    src = _tower(name, quick_gelu=True)
    assert src.quick_gelu and not _tower(name, quick_gelu=False).quick_gelu
    path = tmp_path / "openai-like.safetensors"
    save_file({k: v.contiguous() for k, v in src.visual.state_dict().items()}, path)

    same = load_backbone(BackboneCfg(name=name, pretrained=str(path), quick_gelu=True))
    torch.testing.assert_close(_features(same), _features(src))
    wrong = load_backbone(BackboneCfg(name=name, pretrained=str(path), quick_gelu=False))  # every key loads...
    assert not torch.allclose(_features(wrong), _features(src), atol=1e-3)  # ...and every feature is off
    # auto: neither the file nor the model config says, so the user must (also on meta, i.e. before Ray starts)
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match="backbone.quick_gelu: cannot tell .*set backbone.quick_gelu=true"):
            load_backbone(BackboneCfg(name=name, pretrained=str(path)), device=device)
    # a model config that states the activation decides auto (the tiny config says false; -quickgelu ones true)
    assert not load_backbone(BackboneCfg(name=TINY_VIT, pretrained=str(path))).quick_gelu
    assert resolve_backbone(BackboneCfg(name="ViT-B-16-quickgelu"), fetch=False).quick_gelu
    # an open_clip_config.json beside the file (the Hugging Face hub layout) decides auto, mean and std
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"quick_gelu": True}, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    )
    hub = load_backbone(BackboneCfg(name=name, pretrained=str(path)))
    torch.testing.assert_close(_features(hub), _features(src))
    assert (hub.mean, hub.std) == ((0.5,) * 3, (0.25,) * 3)
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="open_clip_config.json .* is not valid JSON"):
        load_backbone(BackboneCfg(name=name, pretrained=str(path)))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archives_load_with_the_activation_they_were_saved_with(tmp_path, quick_gelu):
    """OpenAI's own CLIP files are TorchScript archives whose modules keep their class names (QuickGELU)."""
    name = _keyless(tmp_path)
    src = _tower(name, quick_gelu)
    archive = torch.jit.trace(ClipWrapper(src.visual).eval(), torch.randn(1, 3, 32, 32), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(archive, str(path))
    r = resolve_backbone(BackboneCfg(name=name, pretrained=str(path)))
    assert (r.quick_gelu, r.sources["quick_gelu"]) == (quick_gelu, "TorchScript archive")
    loaded = load_backbone(BackboneCfg(name=name, pretrained=str(path)))
    assert loaded.quick_gelu == quick_gelu
    torch.testing.assert_close(_features(loaded), _features(src))


def test_timm_towers_refuse_quick_gelu():
    assert not resolve_backbone(BackboneCfg(name=TINY_EVA), fetch=False).quick_gelu
    with pytest.raises(ValueError, match="backbone.quick_gelu: true has no effect on .*timm tower"):
        resolve_backbone(BackboneCfg(name=TINY_EVA, quick_gelu=True), fetch=False)


def test_eval_and_export_rebuild_the_same_activation_and_normalisation(tmp_path):
    """`i2v eval/predict` rebuild the tower from backbone.pretrained, `i2v export` files without it: both must give
    the trained model's activation and mean/std back."""
    from i2v.eval import load_trained
    from i2v.export import export, load_exported
    from i2v.methods import create_method
    from i2v.train.checkpoint import atomic_save

    name = _keyless(tmp_path)
    src = _tower(name, quick_gelu=True)
    tower = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in src.visual.state_dict().items()}, tower)
    cfg = tiny_cfg("st_adapter", f"backbone.name={name}", f"backbone.pretrained={tower}", "backbone.quick_gelu=true")
    cfg.backbone.mean, cfg.backbone.std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    model = create_method(cfg.method, load_backbone(cfg.backbone), cfg.data.num_classes, cfg.data.frames).eval()
    atomic_save({"model": model.trainable_state_dict(), "cfg": cfg.to_dict()}, tmp_path / "final.pt")
    x = torch.randn(2, 4, 3, 32, 32)

    trained, _ = load_trained(tmp_path / "final.pt")
    assert trained.backbone.quick_gelu and (trained.backbone.mean, trained.backbone.std) == (
        model.backbone.mean,
        model.backbone.std,
    )
    torch.testing.assert_close(trained(x), model(x))
    export(tmp_path / "final.pt", tmp_path / "model.safetensors")
    exported = load_exported(tmp_path / "model.safetensors")
    assert exported.backbone.quick_gelu and (exported.backbone.mean, exported.backbone.std) == (
        model.backbone.mean,
        model.backbone.std,
    )
    torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)


def test_run_directory_records_the_resolved_backbone(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from i2v.train.driver import summarise

    monkeypatch.chdir(Path(TINY_VIT).parents[2])  # the smoke config names its backbone relative to the repository
    cfg = load_config("configs/smoke.yaml", ["backbone.std=[0.5,0.5,0.5]"])
    summarise(cfg, tmp_path, SimpleNamespace(error=None, metrics={"val_top1": 1.0}, checkpoint=None))
    resolved = json.loads((tmp_path / "summary.json").read_text())["backbone_resolved"]
    assert resolved == {
        "precision": "fp32",
        "quick_gelu": False,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": [0.5, 0.5, 0.5],
        "from": {"quick_gelu": "model config i2v-tiny-vit", "mean": "CLIP default", "std": "backbone.std"},
    }
