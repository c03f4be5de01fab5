"""AdamW over trainable parameters only, no decay on norms/biases/embeddings, cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch

from i2v.config import TrainCfg
from i2v.methods.base import VideoMethod


def param_groups(model: VideoMethod, weight_decay: float) -> list[dict]:
    """Two groups of trainable parameters: decayed (matrices, convs) and not (1-d: norms, biases; `no_weight_decay()`
    names such as embeddings), as in nanoGPT's `configure_optimizers`."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: VideoMethod, cfg: TrainCfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def cosine_lambda(total_steps: int, warmup_steps: int):
    """lr multiplier: linear from 0 over `warmup_steps`, then cosine to 0 at `total_steps`; stepped per iteration."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainCfg, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total, warmup))
