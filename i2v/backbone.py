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
import dataclasses
import functools
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
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
    to build any size without allocating). `quick_gelu` is the activation, as resolved by `resolve_backbone`."""
    _, cfg = model_config(name)
    return open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (OpenAI's own CLIP files, e.g. ~/.cache/clip/ViT-B-16.pt)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


@functools.lru_cache(maxsize=8)
def torchscript_quick_gelu(path: str) -> bool | None:
    """The activation a TorchScript archive's vision tower uses (its modules keep their class names), None if it
    has neither QuickGELU nor GELU."""
    names = {m.original_name for m in torch.jit.load(path, map_location="cpu").modules()}
    return True if "QuickGELU" in names else False if "GELU" in names else None


def read_checkpoint(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The vision-tower state dict of a full-CLIP or visual-only checkpoint: safetensors, `torch.save` (with `mmap`
    nothing is read until a tensor is used) or a TorchScript archive."""
    sd = read_state_dict(path, mmap)
    if any(k.startswith("visual.") for k in sd):
        sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def read_state_dict(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (safetensors, `torch.save`, TorchScript), without a DDP `module.` prefix."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)  # safetensors maps the file; tensors are materialised on access
    elif is_torchscript(path):
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        sd = sd.get("state_dict", sd)
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _sidecar_config(path: str) -> tuple[str, dict]:
    """(path, contents) of the `open_clip_config.json` beside a checkpoint (Hugging Face hub layout); {} if none."""
    side = Path(path).with_name("open_clip_config.json")
    try:
        return str(side), json.loads(side.read_text()) if side.is_file() else {}
    except ValueError as e:
        raise ValueError(f"backbone.pretrained: {side} (read for {path}) is not valid JSON: {e}") from None


@dataclasses.dataclass(frozen=True)
class ResolvedBackbone:
    """What a `BackboneCfg` resolves to: the file to load and what its weights were trained with."""

    path: str | None  # local checkpoint (None: random init, or a tag not fetched)
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sources: dict[str, str]  # where each of quick_gelu / mean / std came from

    def summary(self) -> dict:
        """JSON-ready record for the run directory."""
        return {"quick_gelu": self.quick_gelu, "mean": list(self.mean), "std": list(self.std), "from": self.sources}


def resolve_pretrained(name: str, pretrained: str | None, fetch: bool = True) -> str | None:
    """The local checkpoint of an open_clip pretrained tag or a local file (None: random init; a tag with
    `fetch=False` is checked but not fetched).

    A tag is fetched (or found in the cache) by open_clip; when that fails (offline, not cached) the error says how
    to pass a local file instead, with the settings that file needs.
    """
    if not pretrained:
        return None
    if Path(pretrained).suffix in CHECKPOINT_SUFFIXES or Path(pretrained).exists():
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"backbone.pretrained: checkpoint {pretrained} does not exist")
        return pretrained
    model_name = Path(name).stem if name.endswith(".json") else name
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"backbone.pretrained: {pretrained!r} is not a local checkpoint file nor an open_clip tag of {model_name} "
            f"(known tags: {tags or 'none'})"
        )
    if not fetch:
        return None
    try:
        return open_clip.pretrained.download_pretrained(pcfg)
    except Exception as e:  # network errors come in many types (URLError, HF hub errors, OSError)
        mean, std = pcfg.get("mean") or open_clip.OPENAI_DATASET_MEAN, pcfg.get("std") or open_clip.OPENAI_DATASET_STD
        quick_gelu = str(bool(pcfg.get("quick_gelu", False))).lower()
        raise RuntimeError(
            f"backbone.pretrained: could not fetch open_clip weights {model_name}:{pretrained} ({type(e).__name__}: "
            f"{e}). Offline machines need a local file: download it where there is network access (e.g. "
            f"`open_clip.create_model('{model_name}', pretrained='{pretrained}')` fills ~/.cache), then set "
            f"backbone.pretrained=/path/to/checkpoint{{.safetensors,.bin,.pt}} (full CLIP or visual-only state dict) "
            f"with what these weights were trained with: backbone.quick_gelu={quick_gelu} "
            f"backbone.mean=[{','.join(map(str, mean))}] backbone.std=[{','.join(map(str, std))}]"
        ) from e


def resolve_backbone(cfg: BackboneCfg, fetch: bool = True) -> ResolvedBackbone:
    """Resolves the checkpoint, activation and input mean/std of `cfg` (see `BackboneCfg.quick_gelu`): explicit keys
    first, then the pretrained tag, then what a local file says, then the model config; a local file whose activation
    nothing decides is an error, since a wrong activation loads without a missing key and every feature is off."""
    path = resolve_pretrained(cfg.name, cfg.pretrained, fetch)
    model_name, mcfg = model_config(cfg.name)
    local = bool(cfg.pretrained) and Path(cfg.pretrained).is_file()
    pcfg = {} if not cfg.pretrained or local else open_clip.get_pretrained_cfg(model_name, cfg.pretrained)
    side_path, side = _sidecar_config(cfg.pretrained) if local else ("", {})
    sources = {}

    timm_name = mcfg["vision_cfg"].get("timm_model_name")
    if timm_name:  # open_clip builds timm towers with timm's own activation
        if cfg.quick_gelu is True:
            raise ValueError(f"backbone.quick_gelu: true has no effect on {cfg.name}, a timm tower ({timm_name})")
        quick_gelu, sources["quick_gelu"] = False, f"timm tower {timm_name}"
    elif cfg.quick_gelu != "auto":
        quick_gelu, sources["quick_gelu"] = cfg.quick_gelu, "backbone.quick_gelu"
    elif pcfg:
        quick_gelu, sources["quick_gelu"] = bool(pcfg.get("quick_gelu", False)), f"pretrained tag {cfg.pretrained}"
    elif local and is_torchscript(cfg.pretrained) and torchscript_quick_gelu(cfg.pretrained) is not None:
        quick_gelu, sources["quick_gelu"] = torchscript_quick_gelu(cfg.pretrained), "TorchScript archive"
    elif "model_cfg" in side:
        quick_gelu, sources["quick_gelu"] = bool(side["model_cfg"].get("quick_gelu", False)), side_path
    elif "quick_gelu" in mcfg:
        quick_gelu, sources["quick_gelu"] = bool(mcfg["quick_gelu"]), f"model config {model_name}"
    elif local:
        raise ValueError(
            f"backbone.quick_gelu: cannot tell which activation {cfg.pretrained} was trained with (auto: the file "
            f"and the {model_name} model config do not say); set backbone.quick_gelu=true for OpenAI CLIP weights "
            f"(QuickGELU, open_clip's -quickgelu models), false for GELU ones (LAION, DataComp, most others)"
        )
    else:
        quick_gelu, sources["quick_gelu"] = False, "random init (GELU)"

    norm = {}
    for key, default in (("mean", open_clip.OPENAI_DATASET_MEAN), ("std", open_clip.OPENAI_DATASET_STD)):
        if getattr(cfg, key) is not None:
            norm[key], sources[key] = getattr(cfg, key), f"backbone.{key}"
        elif pcfg.get(key):
            norm[key], sources[key] = pcfg[key], f"pretrained tag {cfg.pretrained}"
        elif side.get("preprocess_cfg", {}).get(key):
            norm[key], sources[key] = side["preprocess_cfg"][key], side_path
        else:
            norm[key], sources[key] = default, "CLIP default"
    if local and "CLIP default" in (sources["mean"], sources["std"]):
        _logger.info("%s: CLIP's input mean/std (set backbone.mean / backbone.std for other weights)", cfg.pretrained)
    return ResolvedBackbone(path, quick_gelu, tuple(norm["mean"]), tuple(norm["std"]), sources)


def load_visual_state_dict(visual: nn.Module, path: str) -> None:
    """Loads a full-CLIP or visual-only checkpoint into a vision tower; any missing or unexpected key is an error
    (silently unloaded weights are a known failure in this field, cf. adapt-image-models#25)."""
    sd = read_checkpoint(path)
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
        self._shared: dict | None = None  # see shared_outputs

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
    def quick_gelu(self) -> bool:
        """True when the tower's MLPs use QuickGELU (read from the built modules, not from a config)."""
        return any(isinstance(m, QuickGELU) for m in self.visual.modules())

    def pinned_cfg(self, cfg: BackboneCfg) -> BackboneCfg:
        """`cfg` with the activation and mean/std this backbone was built with written out, for rebuilding it
        without `backbone.pretrained` (e.g. from an export)."""
        return dataclasses.replace(cfg, quick_gelu=self.quick_gelu, mean=list(self.mean), std=list(self.std))

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

    @contextlib.contextmanager
    def shared_outputs(self) -> Iterator[None]:
        """Inside the block, no-grad calls with the same video tensor and the same request run the tower once and
        return that one result to every caller: the members of a cohort (i2v/cohort.py), side networks that each call
        the backbone as they would alone, read one forward per batch. Only the latest video's outputs are kept."""
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

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
        if self._shared is None or torch.is_grad_enabled():
            return self._forward(video, indices, pooled)
        # The same storage (its C++ object: also defined for fake tensors) viewed the same way, unchanged since. The
        # entry holds `video`, so no other tensor can take its storage (and its key) while the entry lives.
        view = (video.storage_offset(), video.shape, video.stride(), video.dtype, video._version)
        key = (video.untyped_storage()._cdata, *view)
        if self._shared.get("key") != key:
            self._shared = {"key": key, "video": video}
        request = ("pooled",) if pooled else tuple(self.take_indices(indices))
        if request not in self._shared:
            self._shared[request] = self._forward(video, indices, pooled)
        return self._shared[request]

    def _forward(self, video: torch.Tensor, indices: int | list[int] | None, pooled: bool):
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

    On the `meta` device nothing is allocated, fetched or loaded (used by `i2v describe` for ViT-E-sized models), but
    the settings are resolved, so a config that cannot load fails here already.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    r = resolve_backbone(cfg, fetch=device.type != "meta")
    with device:
        visual = build_vision_tower(cfg.name, quick_gelu=r.quick_gelu)
    embed_dim = model_config(cfg.name)[1]["embed_dim"]
    if r.path is not None and device.type != "meta":
        load_visual_state_dict(visual, r.path)
        _logger.info("loaded %s weights from %s (%s)", cfg.name, r.path, r.summary())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    visual.to(dtype)
    return VideoBackbone(visual, embed_dim, r.mean, r.std).freeze()
