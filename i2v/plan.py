"""`i2v plan`: per-GPU training memory of a method at any size, predicted without allocating, and the largest batch
that fits.

    i2v plan --backbone EVA02-E-14 --method side4video --frames 8 --batch 16 --gpus 8 --gpu-mem 80
    i2v plan --validate docs/bench/train.json      # predicted vs measured, for every row of an `i2v bench train` run

Per-GPU bytes = frozen weights + trainable weights and AdamW states + the step peak, where
- frozen weights are in `--precision`; `replicate` holds all of them, `zero3` holds 1/gpus plus the largest block,
  gathered for its forward;
- trainable weights + AdamW m, v (3x the weight bytes) are replicated (side networks train in DDP) unless `zero3` and
  the method back-propagates into the backbone (one joint ZeRO-3 engine): then 1/gpus;
- the step peak is the peak of live tensors during forward, loss and backward (activations saved for backward,
  transient buffers, gradients), counted by running exactly that code of the requested backbone and method on fake
  tensors (`FakeTensorMode`: shapes and dtypes only, no memory, the CPU kernels' choices, e.g. flash attention) for 1
  and 2 clips. Everything in these models is per clip, so the peak is linear in clips: fixed + per_clip * batch.
  `--precision bf16` (the default) also runs it under bf16 autocast, as mixed-precision training does (and as
  `i2v bench train --amp`); fp32 runs it as the default CPU benchmark does.

Not modelled (hence `--headroom`): CUDA context, NCCL and DDP gradient buckets, cuBLAS/cuDNN workspaces, caching-
allocator fragmentation, the optimizer's temporaries (after backward, when activations are gone); CUDA autocast keeps
a few ops (e.g. softmax) in fp32 where CPU autocast may not. Under joint ZeRO-3 the gradients are counted unsharded
(an overestimate of (1 - 1/gpus) x the trainable weight bytes).
GB = 2**30 bytes, MB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from i2v.bench import MB, VARIANTS, LiveBytes, row_config, saved_bytes
from i2v.config import ExperimentCfg

GB: Final = 2**30


def cohort_members(cfg: ExperimentCfg, cohort: int = 1) -> list[ExperimentCfg]:
    """The member configs a step trains: `train.cohort`'s members, else `cohort` copies of `cfg`."""
    from i2v.cohort import member_configs

    if cfg.train.cohort and cohort > 1:
        raise ValueError(f"--cohort {cohort}: the config already lists its members (train.cohort); give one of the two")
    return member_configs(cfg) if cfg.train.cohort else [cfg] * cohort


def measure_step(cfg: ExperimentCfg, batches: Iterable[int] = (1, 2), amp: bool = False, cohort: int = 1) -> dict:
    """Runs forward, loss and backward of `cfg` on fake tensors, once per batch size. A cohort (`train.cohort`, or
    `cohort` copies of `cfg`) runs as the trainer runs it: one backbone forward shared by all members
    (`VideoBackbone.shared_outputs`), then each member's forward and backward in turn; every member's gradients stay
    alive to the end of the step, as they do between the micro-batches of an accumulation window.

    Returns:
        Byte counts: `frozen`, `trainable` (weights, all members), `largest_block` (backbone block weights), and per
        batch size `saved` (kept for backward; a cohort's: the largest member's) and `live` (step peak, as
        `i2v.bench.LiveBytes`), plus `backbone_no_grad`, `blocks`, `frames`, `tokens` (per frame), `members`.
    """
    from i2v.methods import create_method, create_model

    members = cohort_members(cfg, cohort)
    model = create_model(members[0], device="meta").train()
    backbone = model.backbone
    models = [model] + [
        create_method(m.method, backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames).train()
        for m in members[1:]
    ]
    weights = list({id(t): t for mod in models for t in (*mod.parameters(), *mod.buffers())}.values())
    out = {
        "frozen": sum(t.numel() * t.element_size() for t in weights if not t.requires_grad),
        "trainable": sum(t.numel() * t.element_size() for t in weights if t.requires_grad),
        "largest_block": max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in backbone.blocks),
        "backbone_no_grad": model.backbone_no_grad,
        "blocks": len(backbone.blocks),
        "frames": cfg.data.frames,
        "tokens": math.prod(backbone.grid_size) + backbone.num_prefix_tokens,
        "members": len(models),
        "saved": {},
        "live": {},
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")  # fake CPU tensors: CPU kernel choices, no memory
        for mod in models[1:]:  # the other members: all but the backbone they share
            mod.to_empty(device="cpu", recurse=False)
            for name, child in mod.named_children():
                if name != "backbone":
                    child.to_empty(device="cpu")
        weights = list({id(t): t for mod in models for t in (*mod.parameters(), *mod.buffers())}.values())

        def step(video: torch.Tensor, labels: torch.Tensor) -> int:
            """The step; returns the bytes saved for backward by the member that saves most (members back-propagate
            in turn, so no two members' saved activations are alive at once)."""
            saved = 0
            with backbone.shared_outputs():
                for mod in models:

                    def member(mod: torch.nn.Module = mod) -> None:
                        with autocast:
                            logits = mod(video)
                        F.cross_entropy(logits.float(), labels).backward()

                    saved = max(saved, saved_bytes(member, weights))
            return saved

        for B in batches:
            video = torch.empty(B, cfg.data.frames, 3, *backbone.image_size)
            labels = torch.zeros(B, dtype=torch.long)
            with LiveBytes() as live:
                out["saved"][B] = step(video, labels)
            out["live"][B] = live.peak
            for mod in models:
                mod.zero_grad(set_to_none=True)
    return out


def measure_floor(cfg: ExperimentCfg, batch: int, amp: bool = False) -> int:
    """Peak live bytes of the image tower's no-grad forward on `batch` clips (the benchmark's `floor_nograd`)."""
    from i2v.methods import create_model

    visual = create_model(cfg, device="meta").backbone.visual.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), autocast:
        visual.to_empty(device="cpu")
        frames = torch.empty(batch * cfg.data.frames, 3, *visual.image_size)
        with LiveBytes() as live:
            visual(frames)
    return live.peak


def linear(values: dict[int, int]) -> tuple[float, float]:
    """(fixed, per_clip) through the points measured at 1 and 2 clips."""
    per_clip = values[2] - values[1]
    return values[1] - per_clip, per_clip


def plan(
    cfg: ExperimentCfg,
    batch: int,
    gpus: int,
    gpu_mem_gb: float,
    headroom: float = 0.1,
    amp: bool = True,
    cohort: int = 1,
) -> dict:
    """Predicted per-GPU memory of training `cfg` at `batch` clips per GPU, for replicated and ZeRO-3 frozen weights;
    for a cohort (`train.cohort`, or `cohort` copies of `cfg`) of all its members on one backbone.

    Returns:
        Inputs, the activation model (`step_fixed_gb`, `step_per_clip_gb`, saved-for-backward per clip) and, per
        partition, the memory terms in GB, `fits` and `max_batch` (most clips per GPU that fit in the usable memory);
        for a cohort also `solo_total_gb` (its first member alone), `per_member_gb` (what each further member adds)
        and `max_cohort` (most such members that fit at `batch`).
    """
    if cfg.task != "classification":  # its step: two towers, and a contrastive similarity quadratic in the batch
        raise ValueError(
            f"task: {cfg.task}: i2v plan models classification steps only; measure a retrieval step with "
            "`i2v bench retrieval` (e.g. --device cuda)"
        )
    out = {"backbone": cfg.backbone.name, "method": cfg.method.name, "precision": cfg.backbone.precision, "amp": amp}
    out["frames"] = cfg.data.frames
    m = measure_step(cfg, (1, 2), amp=amp, cohort=cohort)
    out |= {"cohort": m["members"]} | predict(m, batch, gpus, gpu_mem_gb, headroom)
    if m["members"] > 1:
        first = cohort_members(cfg, cohort)[0]
        solo = predict(measure_step(first, (1, 2), amp=amp), batch, gpus, gpu_mem_gb, headroom)["partitions"]
        for name, part in out["partitions"].items():
            per_member = (part["total_gb"] - solo[name]["total_gb"]) / (m["members"] - 1)
            room = out["usable_gb"] - solo[name]["total_gb"]
            part |= {"solo_total_gb": solo[name]["total_gb"], "per_member_gb": per_member}
            part["max_cohort"] = 0 if room < 0 else 1 + math.floor(room / per_member) if per_member > 0 else None
    return out


def predict(m: dict, batch: int, gpus: int, gpu_mem_gb: float, headroom: float = 0.1) -> dict:
    """The memory terms of `plan` from a `measure_step` result taken at 1 and 2 clips."""
    fixed, per_clip = linear(m["live"])
    saved_fixed, saved_per_clip = linear(m["saved"])
    usable = gpu_mem_gb * GB * (1 - headroom)
    out = {
        "batch": batch,
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "usable_gb": usable / GB,
        "step_fixed_gb": fixed / GB,
        "step_per_clip_gb": per_clip / GB,
        "saved_per_clip_gb": saved_per_clip / GB,
        "saved_kb_per_block_token": saved_per_clip / (m["blocks"] * m["frames"] * m["tokens"]) / 1024,
        "partitions": {},
    }
    for partition in ("replicate", "zero3"):
        sharded = partition == "zero3" and gpus > 1
        weights = m["frozen"] / gpus + m["largest_block"] if sharded else m["frozen"]
        states = 3 * m["trainable"] / (gpus if sharded and not m["backbone_no_grad"] else 1)
        step = fixed + per_clip * batch
        total = weights + states + step
        out["partitions"][partition] = {
            "frozen_weights_gb": weights / GB,
            "trainable_and_adamw_gb": states / GB,
            "step_peak_gb": step / GB,
            "saved_for_backward_gb": (saved_fixed + saved_per_clip * batch) / GB,
            "total_gb": total / GB,
            "fits": total <= usable,
            "max_batch": max(0, math.floor((usable - weights - states - fixed) / per_clip)),
        }
    return out


def format_plan(p: dict) -> str:
    head = (
        f"{Path(p['backbone']).stem} + {p['method']}{cohort_text(p)}, {p['frames']} frames, "
        f"{p['batch']} clips per GPU, "
        f"{p['gpus']} GPUs x {p['gpu_mem_gb']:g} GB ({p['usable_gb']:.1f} GB usable), frozen weights {p['precision']}"
        f"{', bf16 autocast' if p['amp'] else ''}\n"
        f"activation model: step peak = {p['step_fixed_gb']:.2f} GB + {p['step_per_clip_gb']:.3f} GB per clip; "
        f"saved for backward {p['saved_per_clip_gb']:.3f} GB per clip "
        f"= {p['saved_kb_per_block_token']:.1f} KB per block per token"
    )
    rows = [
        ("frozen weights (GB)", "frozen_weights_gb", "{:.2f}"),
        ("trainable + AdamW (GB)", "trainable_and_adamw_gb", "{:.2f}"),
        ("step peak (GB)", "step_peak_gb", "{:.2f}"),
        ("  saved for backward (GB)", "saved_for_backward_gb", "{:.2f}"),
        ("total per GPU (GB)", "total_gb", "{:.2f}"),
        ("fits", "fits", "{}"),
        ("largest batch per GPU", "max_batch", "{}"),
    ]
    if p.get("cohort", 1) > 1:
        rows += [
            ("  one member alone (GB)", "solo_total_gb", "{:.2f}"),
            ("  each further member (GB)", "per_member_gb", "{:.2f}"),
            ("largest cohort at this batch", "max_cohort", "{}"),
        ]
    parts = p["partitions"]
    lines = [head, f"{'':28s}{'replicate':>12s}{'zero3':>12s}"]
    for label, key, fmt in rows:
        lines.append(f"{label:28s}" + "".join(f"{fmt.format(parts[k][key]):>12s}" for k in ("replicate", "zero3")))
    return "\n".join(lines)


def cohort_text(p: dict) -> str:
    k = p.get("cohort", 1)
    return f" (cohort of {k} members on one backbone)" if k > 1 else ""


def validate(records: list[dict]) -> list[dict]:
    """Predicted vs measured for every row of an `i2v bench train` run (same config and autocast), with the activation
    model `plan` uses: fitted on 1 and 2 clips, evaluated at the run's batch.

    Compares saved-for-backward bytes (`act_mem_mb`), the step's peak of live tensors (`peak_live_mb`) and the
    device peak above the model (`peak_mem_mb` = AdamW states + step peak).
    """
    out = []
    for r in records:
        cfg = row_config(r["method"], r["backbone"], r["frames"], r["num_classes"], r["overrides"])
        B = r["batch"]
        if r["method"] == "floor_nograd":
            live = saved = peak = measure_floor(cfg, B, amp=r.get("amp", False))
        else:
            m = measure_step(cfg, (1, 2), amp=r.get("amp", False))
            (saved_fixed, saved_per_clip), (fixed, per_clip) = linear(m["saved"]), linear(m["live"])
            saved, live = saved_fixed + saved_per_clip * B, fixed + per_clip * B
            peak = live + 2 * m["trainable"]  # + AdamW m, v created during the benchmark's warm-up
        row = {"method": r["method"]}
        for key, pred in (("act_mem_mb", saved), ("peak_live_mb", live), ("peak_mem_mb", peak)):
            row[f"{key}_pred"], row[f"{key}_meas"] = pred / MB, r[key]
            row[f"{key}_err"] = pred / MB / max(r[key], 1e-9) - 1
        out.append(row)
    return out


def format_validation(rows: list[dict]) -> str:
    lines = [
        "| method | act MB pred / meas | err | peak live MB pred / meas | err | device peak MB pred / meas | err |",
        "|---" + "|---:" * 6 + "|",
    ]
    for r in rows:
        cells = [
            f"{r[f'{k}_pred']:,.0f} / {r[f'{k}_meas']:,.0f} | {r[f'{k}_err']:+.1%}"
            for k in ("act_mem_mb", "peak_live_mb", "peak_mem_mb")
        ]
        lines.append(f"| `{r['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    if args.validate:
        rows = validate(json.loads(Path(args.validate).read_text()))
        print(format_validation(rows))
        result: dict | list = rows
    else:
        overrides = [f"backbone.precision={args.precision}", *args.set]
        cfg = row_config(args.method, args.backbone, args.frames, args.num_classes, overrides)
        amp = args.precision != "fp32"
        result = plan(cfg, args.batch, args.gpus, args.gpu_mem, args.headroom, amp=amp, cohort=args.cohort)
        print(format_plan(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `plan` on the `i2v` parser; sets `func(args) -> int`."""
    p = subparsers.add_parser("plan", help="predict per-GPU training memory and the largest batch that fits")
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip model name or model-config .json")
    p.add_argument("--method", default="side4video", help=f"a registered method or a preset ({', '.join(VARIANTS)})")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="clips per GPU")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=80, help="memory per GPU in GB (2**30 bytes)")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16", help="frozen weights (bf16: + bf16 autocast)"
    )
    p.add_argument("--headroom", type=float, default=0.1, help="fraction kept free for what is not modelled")
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--cohort", type=int, default=1, metavar="K", help="K copies of the method trained as one cohort")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--validate", default=None, metavar="BENCH_JSON", help="compare with an `i2v bench train` run")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.set_defaults(func=_cmd)
    return p


if __name__ == "__main__":
    import sys

    _parser = argparse.ArgumentParser(prog="python -m i2v.plan")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["plan", *sys.argv[1:]])
    sys.exit(_args.func(_args))
