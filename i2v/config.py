"""Experiment configuration: dataclasses are the schema, YAML files are instances, `key=value` overrides on top.

    cfg = load_config("configs/smoke.yaml", ["method.name=st_adapter", "method.bottleneck=128", "train.lr=1e-3"])
    cfg.to_dict()                              # plain nested dict (what Ray Train / Tune pass around)
    ExperimentCfg.from_dict(cfg.to_dict())     # round-trips

The method section is resolved through `method.name`. Overriding `method.name` on the command line switches the whole
method section to that method's defaults (plus any other `method.*` overrides), so one word retargets a run.
Every error names the source (file or "overrides"), the dotted key, and what was expected. A key given twice in
one override list is an error (the shell's brace expansion of an unquoted shard pattern does exactly that).

Imports only stdlib + yaml: the Ray driver validates configs before any worker (or torch) starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the dotted key."""


# ----------------------------------------------------------------------------------------------------------------------
# Schema


@dataclass
class BackboneCfg:
    name: str = "ViT-B-16"  # open_clip model name, or a path to an open_clip model-config JSON file
    pretrained: str | None = None  # open_clip pretrained tag or local checkpoint (.pt/.bin/.safetensors); None: random
    partition: Literal["replicate", "zero3"] = "replicate"  # how training workers hold the frozen weights
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the frozen weights
    # zero3: parameters smaller than this stay whole on every rank (DeepSpeed's default 1e5; 0 partitions everything)
    zero3_persistence_threshold: int = 100_000
    # Activation the weights were trained with: true = QuickGELU (OpenAI CLIP), false = GELU. auto = the pretrained
    # tag's, else what a local file says (TorchScript archive, open_clip_config.json beside it), else the model
    # config's "quick_gelu" key; a local file that none of these decides is an error asking for this key.
    quick_gelu: bool | Literal["auto"] = "auto"
    mean: list[float] | None = None  # input normalisation (RGB, 0-1 scale); None = the tag's, else CLIP's
    std: list[float] | None = None  # as mean; every value > 0

    def __post_init__(self):
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
                raise ValueError(f"backbone.{key}: {value} must be 3 numbers (R, G, B){', each > 0' * (key == 'std')}")


@dataclass
class MethodCfg:
    name: str = ""
    head_dropout: float = 0.5


@dataclass
class LinearProbeCfg(MethodCfg):
    """Frozen backbone; per-frame CLS (ln_post), mean over time, linear head."""

    name: Literal["linear_probe"] = "linear_probe"
    head_dropout: float = 0.0


@dataclass
class FullFinetuneCfg(MethodCfg):
    """Every backbone parameter trains; same head as the linear probe."""

    name: Literal["full_finetune"] = "full_finetune"
    head_dropout: float = 0.5
    grad_checkpointing: bool = False
    layer_decay: float = 1.0  # layer-wise lr decay: block i of L trains at lr * layer_decay ** (L - i); 1 = off
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate at the last block

    def __post_init__(self):
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay: {self.layer_decay} must be in (0, 1]")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path: {self.drop_path} must be in [0, 1)")


@dataclass
class STAdapterCfg(MethodCfg):
    """ST-Adapter (Pan et al., NeurIPS 2022, arXiv 2206.13559)."""

    name: Literal["st_adapter"] = "st_adapter"
    bottleneck: int = 384
    adapter_layers: int | None = None  # adapters in the last N blocks; None = every block
    # Paper figure: before MHSA. Released presets: K400 12x384 before the MLP; SSv2 24x384 before both.
    position: Literal["pre_attn", "pre_mlp", "both"] = "pre_attn"
    kernel_t: int = 3  # depthwise temporal conv kernel (kernel_t, 1, 1)
    grad_checkpointing: bool = False


@dataclass
class ZeroI2VCfg(MethodCfg):
    """ZeroI2V (Li, Zhu, Wang; ECCV 2024, arXiv 2310.01324): STDHA + mergeable linear adapters."""

    name: Literal["zeroi2v"] = "zeroi2v"
    bottleneck: int | None = None  # linear-adapter width; None = width // 4 (192 for ViT-B, 256 for ViT-L)
    adapter_scale: float = 0.5  # 0.5 in the K400 configs, 1.0 in the SSv2 configs; merge() uses the same value
    adapter_dropout: float = 0.1
    adapter_layers: list[int] | None = None  # block indices with adapters + STDHA; None = every block
    # STDHA: head h of frame t takes keys/values from frame t + stdha_offsets[h]; heads past the list stay spatial.
    # K400 B/16: [-1, 1]; L/14 K400 8f: [-1, -1, 1, 1]; B/16 SSv2 16f: [-1, 1, -2, 2].
    stdha_offsets: list[int] = field(default_factory=lambda: [-1, 1])
    grad_checkpointing: bool = False


@dataclass
class Side4VideoCfg(MethodCfg):
    """Side4Video (Yao, Wu, Li; arXiv 2311.15769): spatial-temporal side network, no backprop through the backbone."""

    name: Literal["side4video"] = "side4video"
    head_dropout: float = 0.0
    side_width: int = 320  # 320 for B/16, 512 for L/14, 576 for E/14
    side_head_dim: int = 64  # side attention heads = side_width // side_head_dim
    indices: list[int] | int | None = None  # tapped backbone blocks (timm semantics); one side block per tap
    tap_order: Literal["norm_linear", "linear_norm"] = "norm_linear"  # CLIP variant / EVA variant
    kernel_t: int = 3
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    # A position-embedding row for the shifted [CLS] token in the side attention: the Retrieval code's side table is
    # (1 + L) x side_width (197 x 320 for B/16), the Recognition code's L x side_width. How the Retrieval code uses the
    # extra row is not in the material read; here it is added to the class token, as its 197 rows suggest.
    cls_pos: bool = False
    # CLIP variant, training: keep only what backward needs (each branch's input, the attention's q/k/v/output, the
    # temporal branch's hidden state and the raw taps) and recompute the norms, the depthwise conv, GELU and the MLP's
    # first linear layer in backward: 0.4x the saved activations at about the same step time, same gradients.
    # false: plain autograd (the reference path; the EVA variant and SyncBatchNorm always use it).
    lean_activations: bool = True
    # SyncBatchNorm in the side network: batch statistics over all ranks, for small per-GPU batches (EVA02-E-14 at
    # 1-2 clips per GPU). GPU workers only (torch's SyncBatchNorm does not train on CPU). M-adapter has the same key.
    sync_bn: bool = False


@dataclass
class MAdapterCfg(MethodCfg):
    """M-adapter (Li et al., CVIU 2024) as reconstructed from its abstract: see i2v/methods/m_adapter.py."""

    name: Literal["m_adapter"] = "m_adapter"
    head_dropout: float = 0.0  # no public recipe: Side4Video's (the closest frozen-backbone branch) drop_fc = 0
    width: int = 384  # branch width
    indices: list[int] | int | None = None  # tapped levels; None = every 3rd block ending at the last one
    kernel_t: int = 3  # temporal size of the ConvGLU's depthwise space-time kernel (kernel_t, 3, 3)
    num_heads: int = 6  # heads of the class-token attentions (over patches, over time) and the local correlation
    # the branch's own Conv3d patch embedding (+ BatchNorm3d) of the clip starts its patch state; false = the taps
    # alone (README: the smoke benchmark needs it)
    pixel_embed: bool = True
    # SyncBatchNorm in the branch (its BatchNorm3d layers): batch statistics over all ranks, as Side4Video's key.
    # GPU workers only. false = per-rank statistics (rank 0's running statistics are the ones checkpointed).
    sync_bn: bool = False


METHOD_CFGS: dict[str, type[MethodCfg]] = {
    c.name: c for c in (LinearProbeCfg, FullFinetuneCfg, STAdapterCfg, ZeroI2VCfg, Side4VideoCfg, MAdapterCfg)
}


@dataclass
class DataCfg:
    train_shards: str = ""  # brace pattern / URL(s) of WebDataset tar shards, e.g. "data/train-{000000..000031}.tar"
    val_shards: str = ""
    num_classes: int = 400
    frames: int = 8
    sampler: Literal["segment", "dense"] = "segment"
    stride: int = 4  # dense sampler: frame stride
    size: int = 224
    batch_size: int = 8  # per worker
    num_workers: int = 2  # DataLoader workers per training worker
    epoch_clips: int = 0  # clips per epoch over all ranks (resampled mode); 0 = one pass over the shard index
    shuffle_buffer: int = 256
    flip: bool = True  # off for direction-sensitive label sets without `flip_label_pairs` (the synthetic benchmark)
    # timm RandAugment policy, e.g. "rand-m7-n4-mstd0.5-inc1" (the references' S-c); false/null = off
    randaugment: str | bool | None = None
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    test_clips: int = 1
    test_crops: int = 1
    eval_batch_size: int | None = 0  # videos per evaluation batch per worker (each has V views); 0 or None = batch_size
    # where RandAugment runs: on the stored frames, after the pre-resize (before the crop), or after the flip
    randaugment_at: Literal["before_resize", "before_crop", "after_flip"] = "before_crop"
    # class-name pairs whose labels swap when a training clip is flipped (names as in the shards' labels.json)
    flip_label_pairs: list[list[str]] = field(default_factory=list)
    grayscale_p: float = 0.0  # probability of a grayscale clip (training)
    random_erasing: float = 0.0  # probability of erasing one box, the same on every frame (training)
    random_erasing_mode: Literal["const", "rand"] = "const"  # fill 128, or uniform random pixels
    train_resize: list[int] | None = None  # pre-resize before the crop: [short_side] or [height, width]; null = off
    short_side_jitter: list[int] | None = None  # [lo, hi]: random short side then a random crop, instead of the RRC
    resize_interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # train pre-resize, jitter and test resize
    crop_interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # RandomResizedCrop
    num_repeats: int = 1  # repeated augmentation: samples per decoded training clip, in the same batch
    test_resize: list[int] | None = None  # [short_side] or [height, width] before the test crops; null = [size]
    test_crop_offsets: Literal["long_side", "full_res"] = "long_side"  # 3-crop placement (full_res: Side4Video)

    def __post_init__(self):
        if self.eval_batch_size is not None and self.eval_batch_size < 0:
            raise ValueError(f"eval_batch_size: {self.eval_batch_size} must be >= 0 (0 or null: data.batch_size)")
        if self.randaugment is True:
            raise ValueError(
                "randaugment: true is no longer accepted (it ran torchvision's 2 ops at magnitude 9); give a timm "
                "policy such as 'rand-m7-n4-mstd0.5-inc1', or false/null for off"
            )
        self.randaugment = self.randaugment or None
        if self.randaugment and not re.fullmatch(
            r"rand(-(m\d+|n\d+|p[\d.]+|mstd[\d.]+|mmax\d+|inc[01]|t\w+))*", self.randaugment
        ):
            raise ValueError(
                f"randaugment: {self.randaugment!r} is not a timm RandAugment policy such as 'rand-m7-n4-mstd0.5-inc1'"
            )
        if any(len(pair) != 2 for pair in self.flip_label_pairs):
            raise ValueError(f"flip_label_pairs: {self.flip_label_pairs} must be a list of [name, name] pairs")
        for key in ("grayscale_p", "random_erasing"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}: {getattr(self, key)} must be a probability in [0, 1]")
        for key in ("train_resize", "test_resize"):
            value = getattr(self, key)
            if value is not None and (len(value) not in (1, 2) or min(value) < self.size):
                raise ValueError(f"{key}: {value} must be [short_side] or [height, width], each >= size={self.size}")
        jitter = self.short_side_jitter
        if jitter is not None and (len(jitter) != 2 or not self.size <= jitter[0] <= jitter[1]):
            raise ValueError(f"short_side_jitter: {jitter} must be [lo, hi] with size={self.size} <= lo <= hi")
        if self.num_repeats < 1 or self.batch_size % self.num_repeats:
            raise ValueError(
                f"num_repeats: {self.num_repeats} must be >= 1 and divide batch_size={self.batch_size} "
                "(a batch holds batch_size clips, num_repeats of each video)"
            )


@dataclass
class TrainCfg:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off (no reference recipe clips)
    accum_steps: int = 1
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails
    checkpoint_every: int = 0  # also checkpoint every N training steps, at accumulation boundaries (0: per epoch)
    keep_checkpoints: int = 2
    fail_at_step: int = -1  # fault injection: the last worker raises once at this global step (tests, drills)
    # lr factor per parameter-name glob pattern, first match wins, e.g. {"backbone.*": 0.1} (ZeroI2V L/14)
    lr_mult: dict[str, float] = field(default_factory=dict)
    # weight-decay exemptions: null = 1-d params + the method's no_weight_decay(); a list = names matching these globs
    wd_exempt: list[str] | None = None
    warmup_start: float = 0.0  # lr factor the linear warm-up starts from (ZeroI2V: 0.1)
    # cosine: after the warm-up, per iteration; cosine_epoch: over all epochs from 0, per epoch, x warm-up (mmengine)
    schedule: Literal["cosine", "cosine_epoch"] = "cosine"
    # Cohort training (i2v/cohort.py): one mapping of dotted overrides per member, e.g. [{method.side_width: 64},
    # {method.side_width: 128, train.lr: 3.0e-3}]; the members train side networks on one frozen backbone forward
    # per batch and may differ only in method.* and the optimiser keys (cohort.MEMBER_TRAIN_KEYS). [] = one run.
    cohort: list[dict[str, Any]] = field(default_factory=list)
    # In-cohort successive halving: after the epochs 1, f, f^2, ... (before the last) the members still training
    # keep on only if their val top-1 is among the best ceil(n / f) (ASHA's rungs inside one run); 0 = off.
    cohort_halving: int = 0

    def __post_init__(self):
        if self.cohort_halving < 0 or self.cohort_halving == 1:
            raise ValueError(f"cohort_halving: {self.cohort_halving} must be 0 (off) or a reduction factor >= 2")
        if not 0.0 <= self.warmup_start <= 1.0:
            raise ValueError(f"warmup_start: {self.warmup_start} must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: {self.grad_clip} must be >= 0 (0 = off)")
        bad = {k: v for k, v in self.lr_mult.items() if v < 0}
        if bad:
            raise ValueError(f"lr_mult: {bad} must be factors >= 0")


@dataclass
class RetrievalCfg:
    """Text-video retrieval (`task: retrieval`): CLIP4Clip + DRL's weighted token interaction, as Side4Video's
    Retrieval code (shared/RETRIEVAL_FEWSHOT.md Part 1)."""

    max_words: int = 32  # text length in tokens including <|startoftext|> and <|endoftext|>, zero-padded (ref. 32)
    # The CLIP parts the reference trains at lr x coef_lr (text tower, ln_post and proj of the vision tower,
    # logit_scale): "low_lr" (reference), "frozen" (none of them trains), "full" (at the base lr).
    clip_train: Literal["low_lr", "frozen", "full"] = "low_lr"
    coef_lr: float = 1e-3  # lr factor of those parts under "low_lr"
    # wti: DRL's weighted token-wise interaction over text tokens x frames (reference); mean: cosine of the
    # <|endoftext|> feature and the mean of the normalised frame features (CLIP4Clip's meanP)
    interaction: Literal["wti", "mean"] = "wti"
    logit_scale_max: float = 100.0  # exp(logit_scale) is clamped to this in the loss (reference: 100)
    eval_block: int = 256  # captions (and videos) per block of the test similarity matrix
    save_sim: bool = False  # also write the (captions x videos) test similarity matrix as eval/sim_epoch_NNN.npy

    def __post_init__(self):
        if self.max_words < 3:
            raise ValueError(f"max_words: {self.max_words} must be >= 3 (start, one token, end)")
        if self.coef_lr < 0 or self.logit_scale_max <= 0 or self.eval_block < 1:
            raise ValueError(
                f"coef_lr: {self.coef_lr} must be >= 0, logit_scale_max: {self.logit_scale_max} > 0, "
                f"eval_block: {self.eval_block} >= 1"
            )


@dataclass
class ExperimentCfg:
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    method: MethodCfg = field(default_factory=Side4VideoCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    # classification: clips -> class logits (cross-entropy, top-1/top-5); retrieval: clips and captions -> embeddings
    # (contrastive loss over the global batch, R@K / median rank); see i2v/tasks/
    task: Literal["classification", "retrieval"] = "classification"
    retrieval: RetrievalCfg = field(default_factory=RetrievalCfg)  # used by task: retrieval only

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> ExperimentCfg:
        return _build(cls, d, "", source)


def method_cfg(name: str, source: str = "<dict>", **kwargs) -> MethodCfg:
    """Builds the config of method `name` with its defaults plus `kwargs`."""
    return _build(MethodCfg, {"name": name, **kwargs}, "method", source)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    defaults: list[str] | tuple[str, ...] = (),
) -> ExperimentCfg:
    """Reads a YAML experiment file (or starts from defaults) and applies `key=value` overrides.

    Each key may be given once in `overrides` (and once in `defaults`). `defaults` are applied first, so `overrides`
    may set their keys again: a CLI flag's value under the user's `--set`, `--set` under a sweep's `--trial-set`.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    apply_overrides(raw, defaults)
    apply_overrides(raw, overrides)
    if overrides or defaults:
        source += " + overrides"
    return ExperimentCfg.from_dict(raw, source)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Applies dotted `key=value` strings to a raw nested dict in place; values are parsed as YAML scalars/lists.

    A key given twice is an error, and so is a key together with its own section (`data=...` and `data.frames=8`):
    "the last one wins" would silently drop a value, e.g. an unquoted `shard-{000000..000239}.tar` that the shell
    expanded into 240 overrides of the same key.
    """
    parsed: list[tuple[list[str], Any]] = []
    seen: dict[tuple[str, ...], str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        keys = [k.strip() for k in key.split(".")]
        if not sep or not all(keys):
            raise ConfigError(f"overrides: {item!r}: expected key=value, e.g. train.lr=1e-3")
        for other, other_item in seen.items():
            shorter = min(len(other), len(keys))
            if list(other[:shorter]) == keys[:shorter]:
                name = ".".join(keys if len(keys) >= len(other) else other)
                raise ConfigError(
                    f"overrides: {name}: given twice ({other_item!r} and {item!r}); give each key once"
                    " (quote shard patterns like 'shard-{000000..000239}.tar' so the shell does not expand them)"
                )
        seen[tuple(keys)] = item
        parsed.append((keys, yaml.safe_load(value) if value.strip() else None))
    for keys, value in parsed:
        # Switching methods resets the method section: the file's fields belong to the old method.
        if keys == ["method", "name"] and (raw.get("method") or {}).get("name") != value:
            raw["method"] = {}
    for keys, value in parsed:
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"overrides: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _build(cls: type, d: Any, prefix: str, source: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix or '<root>'}: expected a mapping, got {d!r}")
    if cls is MethodCfg:  # resolve the discriminator
        name = d.get("name", Side4VideoCfg.name)
        if name not in METHOD_CFGS:
            raise ConfigError(f"{source}: {prefix}.name: unknown method {name!r}; choose one of {sorted(METHOD_CFGS)}")
        cls = METHOD_CFGS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{source}: {key}: unknown key; allowed keys are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix or '<root>'}: {e}") from None


def _coerce(v: Any, tp: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, key, source)
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"{source}: {key}: {v!r} is not allowed; choose one of {list(args)}")
        return v
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            if a is type(None):
                if v is None:
                    return None
                continue
            try:
                return _coerce(v, a, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: {key}: expected {_name(tp)}, got {v!r}")
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping {_name(tp)}, got {v!r}")
        return {_coerce(k, args[0], key, source): _coerce(x, args[1], f"{key}.{k}", source) for k, x in v.items()}
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected {_name(tp)}, got {v!r}")
        return [_coerce(x, args[0], f"{key}[{i}]", source) for i, x in enumerate(v)]
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(v)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(v, tp) and not (tp is int and isinstance(v, bool)):
        return v
    raise ConfigError(f"{source}: {key}: expected {_name(tp)}, got {v!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")
