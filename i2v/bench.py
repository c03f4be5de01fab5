"""`i2v bench train | infer | cohort | retrieval`: what each method costs to train and to run, between the two physical
bounds.

    i2v bench train --backbone ViT-B-16 --frames 8 --batch 2 --methods all --json docs/bench/train.json
    i2v bench infer --backbone ViT-B-16 --frames 8 --batch 1 --json docs/bench/infer.json
    i2v bench retrieval --backbone ViT-B-32 --frames 12 --batch 16 --json docs/bench/retrieval.json

Every row runs in a fresh subprocess (`python -m i2v.bench _worker SPEC`), so one row's allocator state and peak
never leak into the next. Weights are random (`backbone.pretrained` stays None), data are random tensors of the
right shape, the optimizer is AdamW over `model.trainable_parameters()`.

Training rows, one step = zero_grad -> forward (bf16 autocast with `--amp`) -> cross-entropy -> backward -> AdamW
step, after `warmup` steps:
- `act_mem_mb`: bytes autograd saves for backward in one step (`saved_tensors_hooks`, each storage counted once,
  parameters and buffers excluded). Device-independent; the figure shared/METHODS.md §5 quotes for the reference code.
- `peak_live_mb`: peak bytes of tensors created during one step and still alive (a `TorchDispatchMode` following
  every storage to its release): saved activations + transient buffers + gradients. Device-independent.
- `peak_mem_mb`: the device's own peak during a step, above the baseline taken once model, optimizer and batch were
  built; it includes AdamW states. CPU: peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`); CUDA:
  `max_memory_allocated` (`reserved_mb`: `max_memory_reserved`, same baseline rule).
- `step_s`: median wall time of `steps` steps (the first one also carries the memory probes, which cost microseconds);
  `step_cpu_s`: median CPU time of the process over the same steps, which other jobs on a shared machine disturb
  far less than wall time (use `--threads 1` there: idle OpenMP threads spin while waiting for a busy core).

Reference rows bounding every method:
- `floor_nograd`: the frozen image tower on every frame under `torch.no_grad` (`backbone.embed_frames`). It saves
  nothing, so its `act_mem_mb` is its working set: the peak of live tensors created during the forward (beyond
  weights and input). Every method runs this forward, so no method can need less activation memory than this;
  a side network that never back-propagates into the backbone adds only what its own layers save.
- `full_finetune`: every weight trains (the usual ceiling; an in-block method can still exceed it, see docs/bench.md).

Retrieval rows (`bench retrieval`, `RETRIEVAL_ROWS`): one training step of `task: retrieval` as i2v trains it, on the
vision + text towers of a random-init CLIP (the task's model, `build_optimizer`'s AdamW groups, the trainer's autocast;
captions of the full `retrieval.max_words`, symmetric InfoNCE over the batch), measured as above, for Side4Video,
CLIP4Clip fine-tuning both towers (`full_finetune` + meanP) and CLIP4Clip with a frozen ViT (`linear_probe` + meanP);
each figure is divided by the fine-tuned CLIP4Clip row's, next to Side4Video's memory figure (5.8 / 3.8 vs 8.2 GB,
shared/RETRIEVAL_FEWSHOT.md 1.9). `total_mem_mb` is the device peak including the weights (CUDA: every tensor
allocated; CPU: the whole process's RSS), the figure closest to the paper's "training memory".

MB = 2**20 bytes throughout.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import re
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from i2v.config import ExperimentCfg, load_config
from i2v.files import atomic_savefig, atomic_write

_logger = logging.getLogger(__name__)

MB: Final = 2**20
FLOOR: Final = "floor_nograd"
CEILING: Final = "full_finetune"
IMAGE: Final = "image_backbone"  # `bench infer` reference row: the image tower on every frame
RATIOS: Final = {
    "act": "act_mem_mb",
    "live": "peak_live_mb",
    "peak": "peak_mem_mb",
    "step": "step_s",
    "step_cpu": "step_cpu_s",
}
# Named presets benchmarked next to the registered methods (row name -> config overrides).
VARIANTS: Final[dict[str, list[str]]] = {
    "st_adapter_12x384_pre_mlp": ["method.name=st_adapter", "method.position=pre_mlp"],  # released K400 preset
    "st_adapter_24x384": ["method.name=st_adapter", "method.position=both"],  # released SSv2 preset
    "side4video_light": ["method.name=side4video", "method.side_width=128"],  # Table 2 light variant (4.4 M)
    "side4video_ckpt": ["method.name=side4video", "method.grad_checkpointing=true"],  # recompute side blocks
    "side4video_plain": ["method.name=side4video", "method.lean_activations=false"],  # plain autograd (before issue 14)
}
# `i2v bench retrieval` rows (task: retrieval): Side4Video's memory figure (imgs/memory.png Table 3, MSR-VTT, ViT-B/32;
# shared/RETRIEVAL_FEWSHOT.md 1.9) as i2v trains each model. Row name -> (config overrides, the figure's GB).
RETRIEVAL_ROWS: Final[dict[str, tuple[list[str], float]]] = {
    # CLIP4Clip (meanP): both towers fine-tuned, frame features mean-pooled
    "clip4clip": (["method.name=full_finetune", "retrieval.interaction=mean"], 8.2),
    # "CLIP4Clip (frozen ViT)": the vision tower under no_grad, its ln_post / proj copies and the text tower train
    "clip4clip_frozen_vit": (["method.name=linear_probe", "retrieval.interaction=mean"], 3.8),
    # Side4Video as its Retrieval code: side width 320, the 197-row side position table, WTI
    "side4video": (["method.name=side4video", "method.side_width=320", "method.cls_pos=true"], 5.8),
}
RETRIEVAL_BASE: Final = "clip4clip"  # the row the others are divided by


# ----------------------------------------------------------------------------------------------------------------------
# Memory probes (device-independent)


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (the C++ StorageImpl): one key per block of memory on real devices, like
    `data_ptr()`, and still distinct for meta and fake tensors, whose storages have no address."""
    return t.untyped_storage()._cdata


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Runs `fn` and returns the bytes autograd saved for backward meanwhile, each storage once, `exclude` (the
    weights) left out."""
    skip = {storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (k := storage_key(t)) not in skip:
            seen[k] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created while active and not yet freed; `peak` is their maximum.

    Outputs that share a storage with an input (views, in-place ops) are not new memory; tensors that existed before
    (weights, optimizer states) are not counted. Works on any device, including fake tensors, so the planner runs
    the same probe without allocating.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (k := storage_key(t)) not in inputs and k not in self.alive:
                st = t.untyped_storage()
                self.alive.add(k)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, k, st.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.live -= nbytes


# ----------------------------------------------------------------------------------------------------------------------
# Device memory: peak since the last reset, in MB


def _proc_status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS follows live memory
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def current_mb(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) now: CUDA caching-allocator figures, or RSS twice on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB, torch.cuda.memory_reserved(device) / MB
    rss = _proc_status_mb("VmRSS")
    return rss, rss


def peak_mb(device: torch.device) -> tuple[float, float]:
    """(allocated, reserved) peaks since `reset_peak`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB, torch.cuda.max_memory_reserved(device) / MB
    hwm = _proc_status_mb("VmHWM")
    return hwm, hwm


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of `fn()`, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


# ----------------------------------------------------------------------------------------------------------------------
# Workers (run inside the per-row subprocess)


def row_config(row: str, backbone: str, frames: int, num_classes: int, overrides: Iterable[str] = ()) -> ExperimentCfg:
    """Config of a benchmark row: a registered method, a `VARIANTS` preset, or the floor (the linear probe's
    backbone). `overrides` (e.g. `backbone.precision=bf16`) apply to every row."""
    method = ["method.name=linear_probe"] if row in (FLOOR, IMAGE) else VARIANTS.get(row, [f"method.name={row}"])
    base = [f"backbone.name={backbone}", f"data.frames={frames}", f"data.num_classes={num_classes}"]
    return load_config(None, list(overrides), defaults=[*base, *method])  # `overrides` may replace the row's keys


def _setup(spec: dict) -> tuple:
    from i2v.methods import create_model

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = row_config(spec["row"], spec["backbone"], spec["frames"], spec["num_classes"], spec["overrides"])
    model = create_model(cfg, device=device)
    B, T = spec["batch"], cfg.data.frames
    video = torch.randn(B, T, 3, *model.backbone.image_size, device=device)
    labels = torch.randint(0, cfg.data.num_classes, (B,), device=device)
    return device, cfg, model, video, labels


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, video: torch.Tensor, labels: torch.Tensor, amp: bool = False
) -> None:
    """What the benchmark measures: zero_grad -> forward (bf16 autocast if `amp`) -> cross-entropy -> backward ->
    optimizer step."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(video)
    F.cross_entropy(logits.float(), labels).backward()
    opt.step()


def train_worker(spec: dict) -> dict:
    """One training row (or the no-grad floor): memory probes and step times."""
    device, cfg, model, video, labels = _setup(spec)
    floor = spec["row"] == FLOOR
    params = model.trainable_parameters()
    opt = None if floor else torch.optim.AdamW(params, lr=1e-4)
    model.eval() if floor else model.train()

    amp = spec.get("amp", False)

    def step() -> None:
        if floor:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model.backbone.embed_frames(video)
        else:
            train_step(model, opt, video, labels, amp=amp)

    m = measure(step, [*model.parameters(), *model.buffers()], device, spec, opt)
    record = {
        "method": spec["row"],
        "method_name": cfg.method.name,
        "backbone": cfg.backbone.name,
        "frames": cfg.data.frames,
        "batch": spec["batch"],
        "num_classes": cfg.data.num_classes,
        "device": str(device),
        "overrides": list(spec["overrides"]),
        "trainable_params": 0 if floor else sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        **m,
        "amp": amp,
        "threads": torch.get_num_threads(),
    }
    if floor:  # saves nothing: its working set is the figure
        record["act_mem_mb"] = record["peak_live_mb"]
    return record


def measure(
    step: Callable[[], object],
    weights: list[torch.Tensor],
    device: torch.device,
    spec: dict,
    opt: torch.optim.Optimizer | None = None,
) -> dict:
    """The figures of one training step (see the module docstring): `spec["warmup"]` unmeasured steps, then
    `spec["steps"]` timed ones, the first also probing saved bytes and the device peak, then one under `LiveBytes`.
    `total_mem_mb` is the device peak including what existed before (weights; on CPU the whole process)."""
    reset_peak(device)
    base, base_reserved = current_mb(device)
    for _ in range(spec["warmup"]):
        step()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    reset_peak(device)
    wall, cpu, act = timed(lambda: saved_bytes(step, weights), device)
    peak, peak_reserved = peak_mb(device)
    times = [(wall, cpu)] + [timed(step, device)[:2] for _ in range(spec["steps"] - 1)]
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    with LiveBytes() as live:
        step()
    out = {
        "act_mem_mb": act / MB,
        "peak_live_mb": live.peak / MB,
        "peak_mem_mb": peak - base,
        "total_mem_mb": peak,
        "step_s": statistics.median(t for t, _ in times),
        "step_cpu_s": statistics.median(c for _, c in times),
        "step_times_s": [t for t, _ in times],
    }
    if device.type == "cuda":
        out["reserved_mb"] = peak_reserved - base_reserved
        out["total_reserved_mb"] = peak_reserved
    return out


def infer_worker(spec: dict) -> dict:
    """Inference latency per clip of a method before and after `merge()`, and of the plain image tower in the same
    process (interleaved with the merged model, so machine load hits both alike)."""
    device, cfg, model, video, _ = _setup(spec)
    model.eval()
    B = video.shape[0]

    def per_clip(fns: list[Callable[[], object]]) -> list[tuple[float, float]]:
        """Median (wall, CPU) seconds per clip of each function, the functions taking turns."""
        with torch.no_grad():
            for fn in fns:
                for _ in range(spec["warmup"]):
                    fn()
            times = [[timed(fn, device)[:2] for fn in fns] for _ in range(spec["steps"])]
        return [tuple(statistics.median(t[i][k] for t in times) / B for k in (0, 1)) for i in range(len(fns))]

    def image_model() -> torch.Tensor:
        return model.backbone.embed_frames(video)

    image = spec["row"] == IMAGE
    ((wall, cpu),) = per_clip([image_model if image else lambda: model(video)])
    merged = model.merge()
    # the image row races itself here: its ratio shows how much timing noise there is
    (merged_wall, merged_cpu), (backbone_wall, backbone_cpu) = per_clip(
        [image_model if image else lambda: merged(video), image_model]
    )
    return {
        "method": spec["row"],
        "latency_s": wall,
        "latency_cpu_s": cpu,
        "merged_latency_s": merged_wall,
        "merged_cpu_s": merged_cpu,
        "backbone_s": backbone_wall,
        "backbone_cpu_s": backbone_cpu,
        "merged_vs_backbone": merged_wall / backbone_wall,
        "merged_vs_backbone_cpu": merged_cpu / backbone_cpu,
        "threads": torch.get_num_threads(),
    }


def retrieval_config(row: str, backbone: str, frames: int, overrides: Iterable[str] = ()) -> ExperimentCfg:
    """Config of an `i2v bench retrieval` row; `overrides` apply after the row's keys."""
    base = ["task=retrieval", f"backbone.name={backbone}", f"data.frames={frames}", *RETRIEVAL_ROWS[row][0]]
    return load_config(None, list(overrides), defaults=base)


def retrieval_worker(spec: dict) -> dict:
    """One retrieval training step as i2v trains it (the task's model, `build_optimizer`'s AdamW groups, the trainer's
    autocast): video + full-length caption ids -> features -> symmetric InfoNCE over the batch -> backward -> step."""
    from i2v.backbone import load_backbone
    from i2v.tasks import get_task
    from i2v.tasks.retrieval import contrastive_loss
    from i2v.train.loop import autocast_for
    from i2v.train.optim import build_optimizer

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = retrieval_config(spec["row"], spec["backbone"], spec["frames"], spec["overrides"])
    model = get_task(cfg).build_model(cfg, load_backbone(cfg.backbone, device=device)).train()
    for p in model.trainable_parameters():  # as the trainer does: AdamW on fp32 copies
        p.data = p.data.float()
    opt = build_optimizer(model, cfg.train)
    B, L = spec["batch"], cfg.retrieval.max_words
    video = torch.randn(B, cfg.data.frames, 3, *model.backbone.image_size, device=device)
    vocab = model.text.tower.token_embedding.num_embeddings
    text = torch.randint(1, vocab - 2, (B, L), device=device)  # captions of the full max_words: SOT ... EOT
    text[:, 0], text[:, -1] = vocab - 2, vocab - 1
    autocast = autocast_for(device, model.backbone.dtype)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = contrastive_loss(model(video, text), cfg.retrieval.interaction)
        loss.backward()
        opt.step()

    m = measure(step, [*model.parameters(), *model.buffers()], device, spec, opt)
    trainable = model.trainable_parameters()
    return {
        "method": spec["row"],
        "method_name": cfg.method.name,
        "interaction": cfg.retrieval.interaction,
        "clip_train": cfg.retrieval.clip_train,
        "backbone": cfg.backbone.name,
        "precision": cfg.backbone.precision,
        "autocast": str(autocast.fast_dtype) if autocast._enabled else None,
        "frames": cfg.data.frames,
        "batch": B,
        "max_words": L,
        "device": str(device),
        "overrides": list(spec["overrides"]),
        "trainable_params": sum(p.numel() for p in trainable),
        "vision_trainable_params": sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")
        ),
        "total_params": sum(p.numel() for p in model.parameters()),
        **m,
        "paper_gb": RETRIEVAL_ROWS[spec["row"]][1],
        "threads": torch.get_num_threads(),
    }


def cohort_worker(spec: dict) -> list[dict]:
    """A K-member cohort step (one backbone forward, K side networks) against K separate single-member steps (K
    backbone forwards), for every K in `spec["sizes"]`, side by side in this one process: the measurements take
    turns, so machine load hits both alike. Members are copies of the row's config, each with its own weights and
    AdamW state."""
    from i2v.methods import create_method

    device, cfg, model, video, labels = _setup(spec)
    amp, sizes = spec.get("amp", False), spec["sizes"]
    members = [model] + [
        create_method(cfg.method, model.backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames)
        for _ in range(max(sizes) - 1)
    ]
    for m in members:
        m.to(device).train()
    opts = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for m in members]

    def cohort(k: int) -> None:
        with model.backbone.shared_outputs():
            for m, opt in zip(members[:k], opts, strict=False):
                train_step(m, opt, video, labels, amp=amp)

    def separate(k: int) -> None:
        for m, opt in zip(members[:k], opts, strict=False):
            train_step(m, opt, video, labels, amp=amp)

    for _ in range(spec["warmup"]):
        cohort(max(sizes))
    times = {(kind, k): [] for kind in ("cohort", "separate") for k in sizes}
    for _ in range(spec["steps"]):
        for k in sizes:
            for kind, fn in (("cohort", cohort), ("separate", separate)):
                times[kind, k].append(timed(lambda fn=fn, k=k: fn(k), device)[:2])
    MiB = lambda ts: sum(t.numel() * t.element_size() for t in ts) / MB  # noqa: E731
    frozen = MiB(model.backbone.parameters())
    member_mb = MiB(members[0].trainable_parameters()) * 3  # weights + AdamW m, v
    records = []
    for k in sizes:
        with LiveBytes() as live:
            cohort(k)
        with LiveBytes() as single:
            separate(1)
        wall = {kind: statistics.median(t for t, _ in times[kind, k]) for kind in ("cohort", "separate")}
        cpu = {kind: statistics.median(c for _, c in times[kind, k]) for kind in ("cohort", "separate")}
        records.append(
            {
                "cohort": k,
                "step_s": wall["cohort"],
                "separate_step_s": wall["separate"],
                "ratio": wall["cohort"] / wall["separate"],
                "step_cpu_s": cpu["cohort"],
                "separate_step_cpu_s": cpu["separate"],
                "cpu_ratio": cpu["cohort"] / cpu["separate"],
                # bytes held: one backbone + k members, against k runs that each hold a backbone and a member
                "weights_mb": frozen + k * member_mb,
                "separate_weights_mb": k * (frozen + member_mb),
                # step peak of live tensors: the cohort step, against one separate run's step
                "peak_live_mb": live.peak / MB,
                "separate_peak_live_mb": single.peak / MB,
                "method": spec["row"],
                "backbone": cfg.backbone.name,
                "frames": cfg.data.frames,
                "batch": spec["batch"],
                "overrides": list(spec["overrides"]),
                "device": str(device),
                "threads": torch.get_num_threads(),
            }
        )
    return records


def cohort_flops(cfg: ExperimentCfg, batch: int = 1) -> dict:
    """FLOPs of one training step on the meta device (nothing allocated, any backbone): the frozen backbone's no-grad
    forward (`backbone`) and one member's side network, forward and backward (`side`: the whole step minus the
    backbone), per `batch` clips."""
    from torch.utils.flop_counter import FlopCounterMode

    from i2v.methods import create_model

    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, precision="fp32"))  # counts only
    if getattr(cfg.method, "lean_activations", False):  # FlopCounterMode cannot follow its custom backward on meta:
        # counted with plain autograd, i.e. without the lean path's recomputation in backward (a lower bound)
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, lean_activations=False))
    model = create_model(cfg, device="meta").train()
    video = torch.empty(batch, cfg.data.frames, 3, *model.backbone.image_size, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(video), labels).backward()
    with torch.no_grad():
        with FlopCounterMode(display=False) as forward:
            model(video)
        with model.backbone.shared_outputs():
            model(video)  # the backbone's outputs for this request are kept ...
            with FlopCounterMode(display=False) as side_forward:
                model(video)  # ... so this forward is the side network's alone
    backbone = forward.get_total_flops() - side_forward.get_total_flops()
    return {"backbone": backbone, "side": step.get_total_flops() - backbone}


def project_cohort(flops: dict, sizes: Iterable[int]) -> list[dict]:
    """Step-time ratio of a k-member cohort to k separate runs if time followed FLOPs:
    (backbone + k side) / (k (backbone + side))."""
    b, s = flops["backbone"], flops["side"]
    return [{"cohort": k, "flop_ratio": (b + k * s) / (k * (b + s))} for k in sizes]


def run_isolated(spec: dict) -> dict:
    """Runs one worker in a fresh Python process and returns its record."""
    proc = subprocess.run(
        [sys.executable, "-m", "i2v.bench", "_worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {spec['row']!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Drivers


def expand_methods(methods: str) -> list[str]:
    """'all' -> every registered method and every `VARIANTS` preset; otherwise a comma list of those names."""
    from i2v.methods import list_methods

    known = [*list_methods(), *VARIANTS]
    names = known if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in known and n != FLOOR]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {known} or 'all'")
    return names


def bench_train(
    backbone: str,
    frames: int = 8,
    batch: int = 2,
    methods: str = "all",
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    num_classes: int = 400,
    overrides: Iterable[str] = (),
    threads: int = 0,
    amp: bool = False,
) -> list[dict]:
    """Benchmarks one training step of every method plus the two reference rows; one subprocess per row.

    Returns:
        One record per row, `floor_nograd` first and `full_finetune` last, with ratios to both.
    """
    names = [n for n in expand_methods(methods) if n not in (FLOOR, CEILING)]
    records = []
    for row in [FLOOR, *names, CEILING]:
        spec = dict(row=row, backbone=backbone, frames=frames, batch=batch, device=device, steps=steps)
        spec |= dict(warmup=warmup, num_classes=num_classes, overrides=list(overrides), threads=threads, amp=amp)
        records.append(run_isolated(spec))
        r = records[-1]
        _logger.info(
            "%-28s act %8.1f MB  peak %8.1f MB  %.3f s/step", row, r["act_mem_mb"], r["peak_mem_mb"], r["step_s"]
        )
    return add_ratios(records)


def bench_retrieval(
    backbone: str = "ViT-B-32",
    frames: int = 12,
    batch: int = 16,
    rows: Iterable[str] = tuple(RETRIEVAL_ROWS),
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    overrides: Iterable[str] = (),
    side_overrides: Iterable[str] = (),
    threads: int = 0,
) -> list[dict]:
    """One retrieval training step of each `RETRIEVAL_ROWS` row (one subprocess each), with every figure divided by
    the fine-tuned CLIP4Clip row's (`*_vs_clip4clip`) and the memory figure's ratio beside it (`paper_vs_clip4clip`).

    Args:
        overrides: config overrides for every row (e.g. backbone.precision=bf16).
        side_overrides: overrides for the side4video row only (e.g. method.side_width=64 on a tiny tower).
    """
    rows = list(dict.fromkeys(rows))
    unknown = [r for r in rows if r not in RETRIEVAL_ROWS]
    if unknown or RETRIEVAL_BASE not in rows:
        raise ValueError(f"--rows: {rows} must name {RETRIEVAL_BASE!r} and only rows of {list(RETRIEVAL_ROWS)}")
    records = []
    for row in [RETRIEVAL_BASE, *(r for r in rows if r != RETRIEVAL_BASE)]:
        extra = [*overrides, *(side_overrides if row == "side4video" else ())]
        spec = dict(row=row, backbone=backbone, frames=frames, batch=batch, device=device, steps=steps)
        spec |= dict(warmup=warmup, overrides=extra, threads=threads, mode="retrieval")
        records.append(run_isolated(spec))
        r = records[-1]
        _logger.info(
            "%-22s act %8.1f MB  peak %8.1f MB  total %8.1f MB  %.2f s/step",
            row,
            r["act_mem_mb"],
            r["peak_mem_mb"],
            r["total_mem_mb"],
            r["step_s"],
        )
    base = records[0]
    for r in records:
        for key in ("act_mem_mb", "peak_live_mb", "peak_mem_mb", "total_mem_mb", "step_cpu_s"):
            r[f"{key.removesuffix('_mb').removesuffix('_s')}_vs_{RETRIEVAL_BASE}"] = r[key] / max(base[key], 1e-9)
        r[f"paper_vs_{RETRIEVAL_BASE}"] = r["paper_gb"] / base["paper_gb"]
    return records


def add_ratios(records: list[dict]) -> list[dict]:
    """Adds `{act,live,peak,step}_vs_{floor,full}`: each figure of `RATIOS` over the floor's and full fine-tuning's."""
    ref = {r["method"]: r for r in records}
    for r in records:
        for short, key in RATIOS.items():
            r[f"{short}_vs_floor"] = r[key] / max(ref[FLOOR][key], 1e-9)
            r[f"{short}_vs_full"] = r[key] / max(ref[CEILING][key], 1e-9)
    return records


def bench_infer(
    backbone: str,
    frames: int = 8,
    batch: int = 1,
    methods: str = "all",
    device: str = "cpu",
    steps: int = 10,
    warmup: int = 2,
    num_classes: int = 400,
    overrides: Iterable[str] = (),
    threads: int = 0,
) -> list[dict]:
    """Inference GFLOPs and latency per clip, before and after `merge()`, against the plain image tower.

    GFLOPs come from `i2v.describe` (one clip on the meta device); latencies from one subprocess per method.
    """
    from i2v.describe import count_flops, describe
    from i2v.methods import create_model

    records = []
    same = ("side4video_ckpt", "side4video_plain")  # checkpointing and lean activations change nothing at inference
    rows = [n for n in expand_methods(methods) if n not in same]
    for row in [IMAGE, *rows]:
        spec = dict(row=row, backbone=backbone, frames=frames, batch=batch, device=device, steps=steps)
        spec |= dict(warmup=warmup, num_classes=num_classes, overrides=list(overrides), threads=threads, mode="infer")
        r = run_isolated(spec)
        cfg = row_config(row, backbone, frames, num_classes, overrides)
        if row == IMAGE:
            visual = create_model(cfg, device="meta").backbone.visual
            flops = count_flops(visual, torch.empty(frames, 3, *visual.image_size, device="meta")) / 1e9
            r |= {"gflops": flops, "merged_gflops": flops}
        else:
            d = describe(cfg)
            r |= {"gflops": d.get("gflops_unmerged", d["gflops"]), "merged_gflops": d["gflops"]}
            r["params"], r["merged_params"] = d["total_params"], d["inference_params"]
        records.append(r)
        _logger.info(
            "%-28s %7.1f GFLOPs  %.3f s/clip (merged %.3f)", row, r["gflops"], r["latency_s"], r["merged_latency_s"]
        )
    base = records[0]
    for r in records:
        r["gflops_vs_backbone"] = r["merged_gflops"] / base["merged_gflops"]
        r["backbone"], r["frames"], r["batch"], r["device"] = backbone, frames, batch, device
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Reports


def markdown_train(records: list[dict]) -> str:
    head = (
        "| method | trainable | act MB | act / floor | act / full FT | peak live MB | live / floor | device peak MB | "
        "peak / floor | peak / full FT | step s | step CPU s | CPU / full FT |"
    )
    lines = [head, "|---" + "|---:" * 12 + "|"]
    for r in records:
        lines.append(
            f"| `{r['method']}` | {r['trainable_params']:,} | {r['act_mem_mb']:,.0f} | {r['act_vs_floor']:.2f} | "
            f"{r['act_vs_full']:.2f} | {r['peak_live_mb']:,.0f} | {r['live_vs_floor']:.2f} | "
            f"{r['peak_mem_mb']:,.0f} | {r['peak_vs_floor']:.2f} | {r['peak_vs_full']:.2f} | "
            f"{r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['step_cpu_vs_full']:.2f} |"
        )
    return "\n".join(lines)


def markdown_retrieval(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        f"{Path(r0['backbone']).stem}, {r0['frames']} frames, batch {r0['batch']}, {r0['max_words']} tokens, "
        f"{r0['device']}, {r0['precision']}{' + ' + r0['autocast'] + ' autocast' if r0['autocast'] else ''}; "
        f"ratios to `{RETRIEVAL_BASE}`",
        "",
        "| row | trainable | of it vision | act MB | act ratio | peak live MB | live ratio | device peak MB | "
        "peak ratio | total MB | total ratio | step CPU s | paper GB | paper ratio |",
        "|---" + "|---:" * 13 + "|",
    ]
    for r in records:
        lines.append(
            f"| `{r['method']}` | {r['trainable_params']:,} | {r['vision_trainable_params']:,} | "
            f"{r['act_mem_mb']:,.0f} | **{r['act_mem_vs_clip4clip']:.2f}** | {r['peak_live_mb']:,.0f} | "
            f"{r['peak_live_vs_clip4clip']:.2f} | {r['peak_mem_mb']:,.0f} | {r['peak_mem_vs_clip4clip']:.2f} | "
            f"{r['total_mem_mb']:,.0f} | {r['total_mem_vs_clip4clip']:.2f} | {r['step_cpu_s']:.2f} | "
            f"{r['paper_gb']} | {r['paper_vs_clip4clip']:.2f} |"
        )
    return "\n".join(lines)


def markdown_infer(records: list[dict]) -> str:
    head = (
        "| method | GFLOPs / clip | merged GFLOPs | GFLOPs / image tower | ms / clip | merged ms | "
        "merged / image tower | merged CPU ms | CPU / image tower |"
    )
    lines = [head, "|---" + "|---:" * 8 + "|"]
    for r in records:
        lines.append(
            f"| `{r['method']}` | {r['gflops']:.1f} | {r['merged_gflops']:.1f} | {r['gflops_vs_backbone']:.3f} | "
            f"{r['latency_s'] * 1e3:,.0f} | {r['merged_latency_s'] * 1e3:,.0f} | {r['merged_vs_backbone']:.3f} | "
            f"{r['merged_cpu_s'] * 1e3:,.0f} | {r['merged_vs_backbone_cpu']:.3f} |"
        )
    return "\n".join(lines)


def plot_train(records: list[dict], path: Path) -> None:
    """Bar charts of activation memory, device peak and step time per method, with floor and ceiling lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["method"] not in (FLOOR, CEILING)]
    ref = {r["method"]: r for r in records}
    step = ("step_cpu_s", "step, CPU time (s)") if records[0]["device"] == "cpu" else ("step_s", "step (s)")
    panels = [("act_mem_mb", "saved for backward (MB)"), ("peak_mem_mb", "device peak (MB)"), step]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 1.8), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        ax.barh([r["method"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.axvline(ref[FLOOR][key], color="tab:green", ls="--", label=f"floor (no-grad forward) {ref[FLOOR][key]:,.1f}")
        ax.axvline(ref[CEILING][key], color="tab:red", ls="--", label=f"full fine-tuning {ref[CEILING][key]:,.1f}")
        ax.set_xlabel(label)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].invert_yaxis()
    r0 = records[0]
    fig.suptitle(f"{Path(r0['backbone']).stem}, {r0['frames']} frames, batch {r0['batch']}, {r0['device']}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)  # closes it


def markdown_of(kind: str):
    """The Markdown table function of a bench kind (train, infer, cohort, retrieval)."""
    return {
        "train": markdown_train,
        "infer": markdown_infer,
        "cohort": markdown_cohort,
        "retrieval": markdown_retrieval,
    }[kind]


def write_outputs(records: list[dict] | dict, json_path: str | Path, kind: str) -> list[Path]:
    """Writes PATH (JSON), PATH.md (Markdown table) and, for training, PATH.png, each atomically; returns the paths."""
    markdown = markdown_of(kind)
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(records, indent=2) + "\n")
    md = path.with_suffix(".md")
    atomic_write(md, markdown(records) + "\n")
    out = [path, md]
    if kind == "train":
        plot_train(records, path.with_suffix(".png"))
        out.append(path.with_suffix(".png"))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def bench_cohort(
    backbone: str,
    method: str = "side4video",
    sizes: Iterable[int] = (1, 2, 4),
    frames: int = 8,
    batch: int = 2,
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    num_classes: int = 400,
    overrides: Iterable[str] = (),
    threads: int = 0,
    amp: bool = False,
    project: str | None = "EVA02-E-14",
) -> dict:
    """Cohort steps against separate steps (one subprocess, `cohort_worker`), with the FLOP model's ratio for the
    measured backbone and its projection to `project`.

    Returns:
        {"rows": one record per cohort size, "projection": {"backbone", "backbone_gflops", "side_gflops", "rows"}}.
    """
    sizes = sorted(set(sizes))
    spec = dict(row=method, backbone=backbone, frames=frames, batch=batch, device=device, steps=steps, warmup=warmup)
    spec |= dict(num_classes=num_classes, overrides=list(overrides), threads=threads, amp=amp, mode="cohort")
    rows = run_isolated(spec | {"sizes": sizes})
    flops = cohort_flops(row_config(method, backbone, frames, num_classes, overrides))
    for r, p in zip(rows, project_cohort(flops, sizes), strict=True):
        r["flop_ratio"] = p["flop_ratio"]
        _logger.info(
            "cohort %d: %.2f s vs %.2f s separate (ratio %.2f)",
            r["cohort"],
            r["step_s"],
            r["separate_step_s"],
            r["ratio"],
        )
    out = {"rows": rows, "projection": None}
    if project:
        flops = cohort_flops(row_config(method, project, frames, num_classes, overrides))
        out["projection"] = {
            "backbone": project,
            "backbone_gflops": flops["backbone"] / 1e9,
            "side_gflops": flops["side"] / 1e9,
            "rows": project_cohort(flops, sizes),
        }
    return out


def markdown_cohort(result: dict) -> str:
    r0 = result["rows"][0]
    lines = [
        f"{Path(r0['backbone']).stem}, {r0['method']} {' '.join(r0['overrides'])}, {r0['frames']} frames, batch "
        f"{r0['batch']}, {r0['device']}",
        "",
        "| K | cohort step s | K separate steps s | ratio | CPU ratio | FLOP ratio | weights + AdamW MB (cohort / "
        "separate) | step peak live MB (cohort / one run) |",
        "|---:" * 8 + "|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cohort']} | {r['step_s']:.2f} | {r['separate_step_s']:.2f} | **{r['ratio']:.2f}** | "
            f"{r['cpu_ratio']:.2f} | {r['flop_ratio']:.2f} | {r['weights_mb']:,.0f} / {r['separate_weights_mb']:,.0f}"
            f" | {r['peak_live_mb']:,.0f} / {r['separate_peak_live_mb']:,.0f} |"
        )
    p = result["projection"]
    if p:
        lines += [
            "",
            f"Projected from FLOPs for {p['backbone']} (backbone {p['backbone_gflops']:,.0f} GFLOPs no-grad forward, "
            f"side network {p['side_gflops']:,.0f} GFLOPs forward + backward per clip):",
            "",
            "| K | FLOP ratio |",
            "|---:|---:|",
            *(f"| {q['cohort']} | {q['flop_ratio']:.3f} |" for q in p["rows"]),
        ]
    return "\n".join(lines)


def _print_and_write(records: list[dict] | dict, json_path: str | None, kind: str) -> int:
    """Prints the kind's Markdown table and, with --json, writes the outputs (`write_outputs`); exit code 0."""
    print(markdown_of(kind)(records))
    if json_path:
        for p in write_outputs(records, json_path, kind):
            print(f"wrote {p}")
    return 0


def _cohort_cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = bench_cohort(
        args.backbone,
        method=args.method,
        sizes=args.sizes,
        frames=args.frames,
        batch=args.batch,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        num_classes=args.num_classes,
        overrides=args.set,
        threads=args.threads,
        amp=args.amp,
        project=args.project or None,
    )
    return _print_and_write(result, args.json, "cohort")


def _retrieval_cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = bench_retrieval(
        args.backbone,
        frames=args.frames,
        batch=args.batch,
        rows=[r.strip() for r in args.rows.split(",") if r.strip()],
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        overrides=args.set,
        side_overrides=args.side_set,
        threads=args.threads,
    )
    return _print_and_write(records, args.json, "retrieval")


def _cmd(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kind = args.bench_command
    fn, extra = (bench_train, {"amp": args.amp}) if kind == "train" else (bench_infer, {})
    records = fn(
        args.backbone,
        frames=args.frames,
        batch=args.batch,
        methods=args.methods,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        num_classes=args.num_classes,
        overrides=args.set,
        threads=args.threads,
        **extra,
    )
    return _print_and_write(records, args.json, kind)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `bench` with sub-commands `train` and `infer` on the `i2v` parser; each sets `func(args) -> int`."""
    parser = subparsers.add_parser("bench", help="training memory/speed and inference cost of every method")
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name, batch, steps, warmup, help_ in (
        ("train", 2, 3, 1, "one training step per method: saved activations, peak memory, step time"),
        ("infer", 1, 10, 2, "inference GFLOPs and latency per clip before/after merge(), vs the image tower"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--backbone", default="ViT-B-16", help="open_clip model name or model-config .json")
        p.add_argument("--frames", type=int, default=8)
        p.add_argument("--batch", type=int, default=batch, help="clips per step")
        p.add_argument("--methods", default="all", help=f"comma list of methods / presets ({', '.join(VARIANTS)})")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        p.add_argument("--steps", type=int, default=steps, help="measured steps (median reported)")
        p.add_argument("--warmup", type=int, default=warmup, help="unmeasured steps first")
        p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
        p.add_argument("--num-classes", type=int, default=400)
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every row")
        p.add_argument("--json", default=None, metavar="PATH", help="write PATH (+ .md table, + .png chart)")
        p.set_defaults(func=_cmd)
    p = sub.choices["train"]
    p.add_argument("--amp", action="store_true", help="bf16 autocast (e.g. with --set backbone.precision=bf16)")
    p = sub.add_parser("cohort", help="a K-member cohort step against K separate steps, and the FLOP projection")
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip model name or model-config .json")
    p.add_argument("--method", default="side4video", help="a side-network method (or preset) the members copy")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="cohort sizes K")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=2, help="clips per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--steps", type=int, default=3, help="measured steps per size and kind (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured cohort steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every member")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (e.g. with --set backbone.precision=bf16)")
    p.add_argument("--project", default="EVA02-E-14", help="backbone to project the FLOP ratio to ('' for none)")
    p.add_argument("--json", default=None, metavar="PATH", help="write PATH (+ .md table)")
    p.set_defaults(func=_cohort_cmd)
    p = sub.add_parser(
        "retrieval", help="retrieval training memory: Side4Video vs fine-tuned CLIP4Clip (memory figure)"
    )
    p.add_argument("--backbone", default="ViT-B-32", help="open_clip model name or model-config .json (random init)")
    p.add_argument("--frames", type=int, default=12, help="frames per clip (the reference's --max_frames 12)")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="clips (one caption each) per step; 16 = the reference recipe's per-GPU batch (128 over 8 GPUs), the "
        "memory figure's own batch is not stated",
    )
    p.add_argument("--rows", default=",".join(RETRIEVAL_ROWS), help=f"comma list of {', '.join(RETRIEVAL_ROWS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every row")
    p.add_argument("--side-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the side4video row")
    p.add_argument("--json", default=None, metavar="PATH", help="write PATH (+ .md table)")
    p.set_defaults(func=_retrieval_cmd)
    return parser


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        spec = json.loads(sys.argv[2])
        workers = {"infer": infer_worker, "cohort": cohort_worker, "retrieval": retrieval_worker}
        print(json.dumps(workers.get(spec.get("mode"), train_worker)(spec)))
        sys.exit(0)
    _parser = argparse.ArgumentParser(prog="python -m i2v.bench")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(_args.func(_args))
