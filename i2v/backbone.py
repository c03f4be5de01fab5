"""Frozen open_clip vision towers with one multi-level feature contract for every family.

    backbone = load_backbone(BackboneCfg(name="ViT-B-16", pretrained="openai"))
    feats, prefix = backbone(video, indices=[3, 7, 11])    # video (B, T, C, H, W)
    # feats[i]: (B, T, L, D) patch tokens after block indices[i]; prefix[i]: (B, T, P, D) class/prefix tokens

Native open_clip `VisionTransformer`s (ViT-B/L/H/bigG) and timm towers inside open_clip (EVA02-E-14 is timm's
`eva02_enormous_patch14_clip_224`) both expose `forward_intermediates`; this module folds the frame axis in and out and
keeps the per-family differences (block list, width, heads) in one place. Indices follow timm's
`feature_take_indices`: None = all blocks, int n = last n, list = explicit (negatives count from the end). Blocks
after the last requested index are never executed.

Only the vision tower is built (never the text tower): it is what ZeRO-3 partitions, and CLIP's 0-dim `logit_scale`
breaks `deepspeed.zero.Init` (see shared/SYSTEMS.md §2.4).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from timm.models._features import feature_take_indices
from torch import nn

from i2v.config import BackboneCfg

_logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Turns random init off while building a model whose every weight is loaded afterwards. Under ZeRO-3's
    zero.Init it also avoids gathering each module for init (EVA02-E-14: 268 s with init vs 29 s without)."""
    import timm.layers
    import timm.models.eva

    def noop(*args, **kwargs):
        return args[0] if args else None

    targets = [(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    targets += [(timm.layers, "trunc_normal_"), (timm.models.eva, "trunc_normal_")]
    targets += [(timm.models.eva.Eva, "_init_weights"), (timm.models.eva.Eva, "fix_init_weight")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, noop)
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def model_config(name: str) -> tuple[str, dict]:
    """Resolves an open_clip model name or a model-config JSON path to (model name, config dict)."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"backbone.name: model-config file {name} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"backbone.name: {name!r} is neither an open_clip model (see open_clip.list_models(), e.g. ViT-B-16, "
            f"ViT-L-14, EVA02-E-14) nor a path to an open_clip model-config .json file"
        )
    return name, cfg


def build_vision_tower(name: str, quick_gelu: bool = False) -> nn.Module:
    """Builds only the vision tower of an open_clip model, on the current default device (use `torch.device('meta')`
    to build any size without allocating)."""
    model_name, cfg = model_config(name)
    quick_gelu = quick_gelu or cfg.get("quick_gelu", False)
    return open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)


def resolve_pretrained(name: str, pretrained: str | None) -> tuple[str | None, bool]:
    """Returns (local checkpoint path or None, quick_gelu) for an open_clip pretrained tag or a local file.

    A tag is fetched (or found in the cache) by open_clip; when that fails (offline, not cached) the error says how
    to pass a local file instead.
    """
    if not pretrained:
        return None, False
    if Path(pretrained).suffix in CHECKPOINT_SUFFIXES or Path(pretrained).exists():
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"backbone.pretrained: checkpoint {pretrained} does not exist")
        return pretrained, False
    model_name = Path(name).stem if name.endswith(".json") else name
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"backbone.pretrained: {pretrained!r} is not a local checkpoint file nor an open_clip tag of {model_name} "
            f"(known tags: {tags or 'none'})"
        )
    try:
        path = open_clip.pretrained.download_pretrained(pcfg)
    except Exception as e:  # network errors come in many types (URLError, HF hub errors, OSError)
        raise RuntimeError(
            f"backbone.pretrained: could not fetch open_clip weights {model_name}:{pretrained} ({type(e).__name__}: "
            f"{e}). Offline machines need a local file: download it where there is network access (e.g. "
            f"`open_clip.create_model('{model_name}', pretrained='{pretrained}')` fills ~/.cache), then set "
            f"backbone.pretrained=/path/to/checkpoint{{.safetensors,.bin,.pt}} (full CLIP or visual-only state dict)"
        ) from e
    return path, bool(pcfg.get("quick_gelu", False))


def image_norm(name: str, pretrained: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std the weights were trained with: the pretrained tag's own (e.g. SigLIP's 0.5), else CLIP's."""
    model_name = Path(name).stem if name.endswith(".json") else name
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    mean = pcfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = pcfg.get("std") or open_clip.OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def load_visual_state_dict(visual: nn.Module, path: str) -> None:
    """Loads a full-CLIP or visual-only checkpoint into a vision tower; any missing or unexpected key is an error
    (silently unloaded weights are a known failure in this field, cf. adapt-image-models#25)."""
    sd = open_clip.factory.load_state_dict(path)
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    own = visual.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"backbone.pretrained: {path} does not match the vision tower: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches {wrong[:5]}"
        )
    visual.load_state_dict(sd)


class VideoBackbone(nn.Module):
    """An open_clip vision tower applied frame by frame; frozen by default.

    Attributes:
        visual: the open_clip vision tower (`VisionTransformer` or `TimmModel`), registered as a child so `.to()`,
            `state_dict()` and ZeRO-3 partitioning see it.
    """

    def __init__(self, visual: nn.Module, output_dim: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.visual = visual
        self.output_dim = output_dim  # width of the pooled image embedding, `visual(images)`
        self.mean, self.std = tuple(mean), tuple(std)
        self.frozen = False

    # -- structure ------------------------------------------------------------------------------------------------
    @property
    def is_native(self) -> bool:
        """True for open_clip's own VisionTransformer (the tower the in-block adapters know how to wrap)."""
        return isinstance(self.visual, VisionTransformer)

    @property
    def trunk(self) -> nn.Module:
        return self.visual if self.is_native else self.visual.trunk

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks if self.is_native else self.visual.trunk.blocks

    @property
    def width(self) -> int:
        return self.visual.transformer.width if self.is_native else self.visual.trunk.embed_dim

    @property
    def num_heads(self) -> int:
        blk = self.blocks[0]
        return blk.attn.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.is_native else self.visual.trunk.num_prefix_tokens

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.is_native:
            return tuple(self.visual.grid_size)
        return tuple(self.visual.trunk.patch_embed.grid_size)

    # -- freezing ---------------------------------------------------------------------------------------------------
    def freeze(self) -> VideoBackbone:
        """No parameter requires grad and the tower stays in eval mode, whatever `.train()` is called later.
        Idempotent."""
        self.frozen = True
        self.visual.requires_grad_(False)
        self.visual.eval()
        return self

    def unfreeze(self) -> VideoBackbone:
        """Every parameter trains (full fine-tuning)."""
        self.frozen = False
        self.visual.requires_grad_(True)
        self.visual.train(self.training)
        return self

    def train(self, mode: bool = True) -> VideoBackbone:
        super().train(mode)
        if self.frozen:
            self.visual.eval()  # frozen weights keep inference behaviour (dropout, patch dropout off)
        return self

    # -- forward ----------------------------------------------------------------------------------------------------
    def take_indices(self, indices: int | list[int] | None) -> list[int]:
        """Normalises timm-style indices to a sorted list of non-negative block indices."""
        take, _ = feature_take_indices(len(self.blocks), indices)
        return sorted(take)

    def forward(self, video: torch.Tensor, indices: int | list[int] | None = None, pooled: bool = False):
        """Per-layer tokens of a video, or with `pooled=True` the image embedding of every frame.

        Methods call the backbone through this one entry point, so a ZeRO-3 engine wrapping it sees every use.

        Args:
            video: (B, T, C, H, W) normalised frames.
            indices: blocks to return (timm semantics); blocks after the last one are not run.
            pooled: return `embed_frames(video)` (B, T, output_dim) instead.

        Returns:
            (patch tokens, prefix tokens): lists with one (B, T, L, D) / (B, T, P, D) tensor per index, in block order.
        """
        video = video.to(self.dtype)
        if pooled:
            return self.embed_frames(video)
        B, T = video.shape[:2]
        out = self.visual.forward_intermediates(
            video.flatten(0, 1),  # (B*T, C, H, W)
            indices=self.take_indices(indices),
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        patches = [x.unflatten(0, (B, T)) for x in out["image_intermediates"]]
        prefix = [x.unflatten(0, (B, T)) for x in out["image_intermediates_prefix"]]
        return patches, prefix

    def embed_tokens(self, video: torch.Tensor, temporal: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of every frame, ready for the first block (native towers only).

        Args:
            video: (B, T, C, H, W).
            temporal: optional (T, D) embedding added to every token of frame t before `ln_pre` (ZeroI2V).

        Returns:
            (B*T, 1 + L, D) tokens, class token first.
        """
        self.require_native("embed_tokens")
        v = self.visual
        B, T = video.shape[:2]
        x = v.conv1(video.to(self.dtype).flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, L, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B*T, 1 + L, D)
        if temporal is not None:
            x = (x.unflatten(0, (B, T)) + temporal[:, None].to(x.dtype)).flatten(0, 1)
        return v.ln_pre(v.patch_dropout(x))

    def require_native(self, what: str) -> None:
        if not self.is_native:
            raise NotImplementedError(
                f"{what} needs an open_clip VisionTransformer tower (ViT-B/L/H/bigG); {type(self.trunk).__name__} "
                f"towers (timm, e.g. EVA02-E-14) work with the side-network methods (side4video, m_adapter), "
                f"linear_probe and full_finetune"
            )

    def embed_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Pooled image embedding of every frame: (B, T, C, H, W) -> (B, T, output_dim)."""
        B, T = video.shape[:2]
        return self.visual(video.flatten(0, 1)).unflatten(0, (B, T))


def load_backbone(cfg: BackboneCfg, device: torch.device | str | None = None) -> VideoBackbone:
    """Builds the vision tower of `cfg.name`, loads `cfg.pretrained` and freezes it.

    On the `meta` device nothing is allocated or loaded (used by `i2v describe` for ViT-E-sized models).
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    path, quick_gelu = (None, False) if device.type == "meta" else resolve_pretrained(cfg.name, cfg.pretrained)
    with device:
        visual = build_vision_tower(cfg.name, quick_gelu=quick_gelu)
    embed_dim = model_config(cfg.name)[1]["embed_dim"]
    if path is not None:
        load_visual_state_dict(visual, path)
        _logger.info("loaded %s weights from %s", cfg.name, path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    visual.to(dtype)
    mean, std = image_norm(cfg.name, cfg.pretrained)
    return VideoBackbone(visual, embed_dim, mean, std).freeze()
