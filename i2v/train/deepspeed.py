"""All of i2v's DeepSpeed code: the frozen backbone partitioned with ZeRO stage 3 across training workers.

Two recipes (measured in shared/SYSTEMS.md §2):
- A, side networks (`method.backbone_no_grad`): the backbone sits in its own optimizer-less ZeRO-3 engine and runs
  under no_grad, gathered block by block; the trainable side network trains in plain DDP beside it.
- B, gradients through the backbone (ST-Adapter, ZeroI2V, full fine-tuning): one joint ZeRO-3 engine over the whole
  model with an optimizer over the trainable parameters (an optimizer-less engine cannot back-propagate).

The backbone is built under `deepspeed.zero.Init`, so no worker ever materialises it whole; each rank then copies its
own flat slice of every parameter from a memory-mapped checkpoint (no collectives, no full-model read).
Only the vision tower is built (CLIP's 0-dim `logit_scale` breaks zero.Init's broadcast).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from i2v.backbone import VideoBackbone, build_vision_tower, model_config, read_checkpoint, resolve_backbone, skip_init
from i2v.config import ExperimentCfg

_logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ds_config(cfg: ExperimentCfg, with_optimizer: bool) -> dict:
    """The DeepSpeed config, generated from the experiment config (never hand-kept beside it).

    Every dtype DeepSpeed would otherwise pick is spelled out: the frozen weights are held in `backbone.precision`
    (`bf16`/`fp16` enabled says so, for `zero.Init` too, see `build_partitioned_backbone`); gradients accumulate and
    are reduced in fp32 (DeepSpeed's default is the model dtype, which rounds an fp32 adapter's gradients to bf16);
    master weights and optimizer state stay fp32.
    """
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,  # required even without an optimizer
        "gradient_accumulation_steps": cfg.train.accum_steps,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": cfg.backbone.zero3_persistence_threshold,
        },
        "bf16": {"enabled": cfg.backbone.precision == "bf16", "bf16_master_weights_and_grads": False},
        "fp16": {"enabled": cfg.backbone.precision == "fp16", "fp16_master_weights_and_grads": False},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if with_optimizer and cfg.train.grad_clip > 0:
        out["gradient_clipping"] = cfg.train.grad_clip
    return out


def check_dtype(module: nn.Module, precision: str, when: str) -> None:
    """Raises unless every frozen parameter of `module` (and the slice this rank holds of it) is in `precision`."""
    want = DTYPES[precision]
    for name, p in module.named_parameters():
        held = p.ds_tensor.dtype if hasattr(p, "ds_tensor") else p.dtype
        if not p.requires_grad and (p.dtype != want or held != want):
            import deepspeed

            raise RuntimeError(
                f"backbone.precision: {precision} asked, but {when} DeepSpeed {deepspeed.__version__} holds {name} "
                f"as {held} (parameter dtype {p.dtype}); refusing to run on weights in another precision"
            )


@torch.no_grad()
def load_partitioned(visual: nn.Module, path: str, sd: dict[str, torch.Tensor] | None = None) -> None:
    """Copies into every ZeRO-3 parameter only this rank's flat slice of the checkpoint tensor (`sd`: the state
    dict to take, default the vision tower's of `path`, memory-mapped)."""
    sd = read_checkpoint(path, mmap=True) if sd is None else sd
    names = dict(visual.named_parameters())
    missing, unexpected = sorted(set(names) - set(sd)), sorted(set(sd) - set(names) - set(dict(visual.named_buffers())))
    if missing or unexpected:
        raise ValueError(f"backbone.pretrained: {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    rank = dist.get_rank()
    for name, p in names.items():
        full = sd[name]
        if tuple(full.shape) != tuple(p.ds_shape):
            raise ValueError(
                f"backbone.pretrained: {path}: {name} has shape {tuple(full.shape)}, expected {p.ds_shape}"
            )
        if getattr(p, "ds_persist", False):  # below the persistence threshold: every rank holds it whole
            p.data.copy_(full.to(p.dtype))
        n = p.ds_tensor.numel()
        chunk = full.reshape(-1)[rank * n : (rank + 1) * n]
        p.ds_tensor.data[: chunk.numel()].copy_(chunk.to(p.ds_tensor.dtype))
    for name, b in visual.named_buffers():  # buffers (e.g. RoPE tables) are not partitioned
        if name in sd:
            b.copy_(sd[name].to(b.dtype))


def build_partitioned_backbone(cfg: ExperimentCfg) -> VideoBackbone:
    """The frozen vision tower, partitioned over the current process group as it is built, in
    `backbone.precision` (checked: a RuntimeError if DeepSpeed holds it in any other dtype)."""
    import deepspeed

    r = resolve_backbone(cfg.backbone)
    init = skip_init() if r.path else contextlib.nullcontext()  # every weight is loaded afterwards
    # The dtype travels in the config (bf16/fp16 enabled or not), never as `dtype=`: DeepSpeed 0.19's
    # Init._set_dtype reads `dtype or fp16 if fp16_supported else bf16 ...`, so an explicit torch.float32 becomes
    # bf16 on every CPU without oneDNN fp16 (e.g. AMD EPYC); without `dtype` it follows the config.
    with init, deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, False)):
        visual = build_vision_tower(cfg.backbone.name, quick_gelu=r.quick_gelu)
    visual.requires_grad_(False)
    check_dtype(visual, cfg.backbone.precision, "after zero.Init")
    if r.path:
        load_partitioned(visual, r.path)

    embed_dim = model_config(cfg.backbone.name)[1]["embed_dim"]
    return VideoBackbone(visual, embed_dim, r.mean, r.std).freeze()


def build_partitioned_text(cfg: ExperimentCfg):
    """(TextEncoder, logit_scale) with the text tower partitioned as it is built, under the same dtype rules as
    `build_partitioned_backbone` (retrieval)."""
    import deepspeed

    from i2v.text import TextEncoder, build_text_tower, read_text_checkpoint

    r = resolve_backbone(cfg.backbone)
    init = skip_init() if r.path else contextlib.nullcontext()
    with init, deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, False)):
        tower = build_text_tower(cfg.backbone.name, quick_gelu=r.quick_gelu)
    tower.requires_grad_(False)
    check_dtype(tower, cfg.backbone.precision, "after zero.Init")
    scale = torch.tensor(1 / 0.07).log()
    if r.path:
        sd = read_text_checkpoint(r.path, mmap=True)
        if "logit_scale" not in sd:
            raise ValueError(
                f"backbone.pretrained: {r.path} has no logit_scale (retrieval needs a full CLIP checkpoint)"
            )
        scale = sd.pop("logit_scale").float().reshape(())
        load_partitioned(tower, r.path, sd)
    return TextEncoder(tower, cfg.retrieval.max_words), scale


def register_external_parameters(module: nn.Module, backbone: VideoBackbone) -> None:
    """ZeRO-3 gathers a module's own parameters when that module is *called*. The tower's direct parameters
    (class/position embeddings, projection) are read by `forward_intermediates` / `embed_tokens`, which are methods,
    so they are tied to the module whose call encloses those reads."""
    import deepspeed

    owners = [backbone.visual] + ([backbone.trunk] if backbone.trunk is not backbone.visual else [])
    for owner in owners:
        for p in owner.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(module, p)


def held_numel(module: nn.Module) -> int:
    """Parameter elements this rank actually stores (its ZeRO-3 partitions plus unpartitioned parameters)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def full_numel(module: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())


def init_distributed(backend: str) -> None:
    """Wraps the process group Ray already created (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))  # shm kernel init, SYSTEMS §2.6
    deepspeed.init_distributed(dist_backend=backend)
    release_shm_buffer()


def shm_buffer_path(rank: int) -> Path:
    """The POSIX shared-memory segment DeepSpeed's CPU all-reduce op creates for one rank (ops/csrc/cpu/comm/shm.cpp:
    `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, ~66 MB, only when all ranks are local)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shm segment once every rank has mapped its peers' segments.

    DeepSpeed 0.19 never unlinks it (`shared_close` is never called), so each run left ~66 MB per rank in /dev/shm,
    i.e. in RAM, until reboot: a day of sweeps on one node fills it, and Ray's OOM killer then kills trials. Each rank
    maps every peer's segment inside `init_distributed`, so after a barrier the names are no longer needed; the
    mappings stay valid and the memory is freed when the last process using it exits (however it exits)."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":  # the op exists on the CPU accelerator only
        return
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)
    dist.barrier()  # so that, on return, no rank's name is left


def side_engine(backbone: VideoBackbone, cfg: ExperimentCfg):
    """Recipe A: the partitioned backbone in an optimizer-less ZeRO-3 engine (gathers block by block on call)."""
    import deepspeed

    register_external_parameters(backbone, backbone)
    engine, *_ = deepspeed.initialize(model=backbone, config=ds_config(cfg, False))
    check_dtype(backbone, cfg.backbone.precision, "after deepspeed.initialize")
    engine.eval()
    return engine


def joint_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler_fn, cfg: ExperimentCfg):
    """Recipe B: one ZeRO-3 engine over backbone + adapters, its optimizer over the trainable parameters."""
    import deepspeed

    trainable = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    if len(trainable) > 1:  # DeepSpeed's ZeRO-3 optimizer flattens them into one buffer (an assert deep inside)
        raise ValueError(
            f"backbone.partition: zero3 trains {cfg.method.name} in one DeepSpeed engine, whose optimizer needs one "
            f"dtype, but its trainable parameters mix {sorted(trainable)}; use backbone.precision=fp32"
        )
    register_external_parameters(model, model.backbone)
    for owner, p in getattr(model, "zero3_external_parameters", lambda: [])():
        deepspeed.zero.register_external_parameter(owner, p)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler_fn, config=ds_config(cfg, True)
    )
    check_dtype(model.backbone, cfg.backbone.precision, "after deepspeed.initialize")
    return engine, optimizer, scheduler


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 parameters inside the block (read-only); a no-op for ordinary parameters."""
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


def save_engine(engine, directory: Path, tag: str) -> None:
    """Every rank writes its shard of trainable weights + optimizer state (frozen weights excluded)."""
    engine.save_checkpoint(str(directory), tag=tag, exclude_frozen_parameters=True)


def load_engine(engine, directory: Path, tag: str) -> None:
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
    if path is None:  # DeepSpeed returns (None, None) instead of raising when shards are missing
        raise FileNotFoundError(f"{directory}: no DeepSpeed shards with tag {tag!r} (is the run directory shared?)")
