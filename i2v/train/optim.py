"""AdamW over trainable parameters in groups (lr multiplier x weight decay), cosine schedule with linear warm-up.

Per parameter (by name, as in `model.named_parameters()`):
- lr factor: the first `train.lr_mult` glob pattern that matches it (else 1), times the method's own factor from
  `lr_scales()` when it has one (layer decay of `full_finetune`);
- weight decay: `train.weight_decay`, or 0 when exempt. `train.wd_exempt: null` exempts every 1-d parameter (norms,
  biases) and the method's `no_weight_decay()` names, as nanoGPT's `configure_optimizers`; a list exempts exactly the
  names matching one of its glob patterns (`[]`: decay everything, as Side4Video does).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch

from i2v.config import TrainCfg
from i2v.methods.base import VideoMethod


def lr_factor(name: str, lr_mult: dict[str, float]) -> float:
    """The `train.lr_mult` factor of a parameter name: the first matching glob pattern's, else 1."""
    return next((f for pattern, f in lr_mult.items() if fnmatchcase(name, pattern)), 1.0)


def param_groups(model: VideoMethod, cfg: TrainCfg) -> list[dict]:
    """Trainable parameters grouped by (lr factor, weight decay); each group carries its own `lr`."""
    skip = model.no_weight_decay()
    scales = getattr(model, "lr_scales", dict)()  # name -> method-defined factor (layer decay)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.wd_exempt is None:
            exempt = p.ndim < 2 or name in skip
        else:
            exempt = any(fnmatchcase(name, pattern) for pattern in cfg.wd_exempt)
        factor = lr_factor(name, cfg.lr_mult) * scales.get(name, 1.0)
        groups.setdefault((factor, 0.0 if exempt else cfg.weight_decay), []).append(p)
    return [{"params": params, "weight_decay": wd, "lr": cfg.lr * factor} for (factor, wd), params in groups.items()]


def build_optimizer(model: VideoMethod, cfg: TrainCfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def cosine_lambda(
    total_steps: int,
    warmup_steps: int,
    *,
    warmup_start: float = 0.0,
    schedule: str = "cosine",
    steps_per_epoch: int = 1,
):
    """lr multiplier per optimizer step.

    "cosine": linear from `warmup_start` over `warmup_steps`, then cosine to 0 at `total_steps`, per iteration
    (ST-Adapter; Side4Video updates every 10 iterations). "cosine_epoch": mmengine's LinearLR x CosineAnnealingLR as
    ZeroI2V chains them: the linear warm-up factor times a cosine over all epochs from epoch 0 (overlapping the
    warm-up), updated once per epoch.
    """

    def warm(step: int) -> float:
        return warmup_start + (1.0 - warmup_start) * (step + 1) / warmup_steps

    def fn(step: int) -> float:
        if schedule == "cosine_epoch":
            epochs = max(1, total_steps // steps_per_epoch)
            cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step // steps_per_epoch) / epochs)))
            return cos * (warm(step) if step < warmup_steps else 1.0)
        if step < warmup_steps:
            return warm(step)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainCfg, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    fn = cosine_lambda(
        total, warmup, warmup_start=cfg.warmup_start, schedule=cfg.schedule, steps_per_epoch=steps_per_epoch
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
