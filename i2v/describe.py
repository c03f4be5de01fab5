"""`i2v describe`: parameter counts and inference FLOPs of a method on a backbone, without allocating weights.

Everything is built on the `meta` device, so ViT-E (4.4B) costs no memory. FLOPs are counted by
`torch.utils.flop_counter.FlopCounterMode` on a forward of one clip (B=1, the config's T, C, H, W), 2 FLOPs per
multiply-add; `gmacs` is the multiply-add count the papers call "GFLOPs" (fvcore convention), per view.
For ZeroI2V `gflops` is the merged (inference) model; `gflops_unmerged` is the training-time graph.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from i2v.config import ExperimentCfg
from i2v.methods import create_model


def count_flops(model: torch.nn.Module, video: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(video)
    return counter.get_total_flops()


def describe(cfg: ExperimentCfg) -> dict:
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, precision="fp32"))  # counts only
    model = create_model(cfg, device="meta").eval()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    backbone = model.backbone
    video = torch.empty(1, cfg.data.frames, 3, *backbone.image_size, device="meta")
    unmerged = count_flops(model, video)
    merged_model = model.merge()
    flops = count_flops(merged_model, video)
    out = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "frames": cfg.data.frames,
        "num_classes": cfg.data.num_classes,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "total_params": total,
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "inference_params": sum(p.numel() for p in merged_model.parameters()),
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
    }
    if flops != unmerged:
        out["gflops_unmerged"] = unmerged / 1e9
    return out


def format_table(rows: list[dict]) -> str:
    cols = [
        ("method", "method", "{}"),
        ("trainable", "trainable_params", "{:,}"),
        ("frozen", "frozen_params", "{:,}"),
        ("total", "total_params", "{:,}"),
        ("GFLOPs", "gflops", "{:.1f}"),
        ("GMACs", "gmacs", "{:.1f}"),
    ]
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for row in cells:  # first column left-aligned, numbers right-aligned
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
