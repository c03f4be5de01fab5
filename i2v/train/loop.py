"""The Ray Train worker function: everything is rebuilt from the config dict (no module globals).

    train_fn_per_worker({"cfg": ExperimentCfg.to_dict(), "run_dir": "...", "progress": True})

Per worker: [1] seed and process group, [2] backbone (replicated, or partitioned with ZeRO-3) and method,
[3] optimizer/schedule/engines for the partition mode, [4] resume from `ray.train.get_checkpoint()`, [5] epochs of
resampled WebDataset batches (the same number on every rank, so collectives never hang), validation with multi-view
averaging, `ray.train.report` + checkpoint every epoch (and every `train.checkpoint_every` steps).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from i2v.backbone import load_backbone
from i2v.cohort import member_configs, rungs, survivors
from i2v.config import ExperimentCfg
from i2v.eval import evaluate_many
from i2v.files import atomic_write
from i2v.methods import VideoMethod
from i2v.tasks import get_task
from i2v.train import checkpoint as ckpt
from i2v.train.optim import build_optimizer, build_scheduler

_logger = logging.getLogger(__name__)


def peak_mem_mb(device: torch.device) -> float:
    """CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def autocast_for(device: torch.device, frozen_dtype: torch.dtype):
    """bf16 autocast on GPU; on CPU fp32, or the frozen weights' half dtype when they are stored in one."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce of a few floats, on the training device (NCCL has no CPU tensors)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


@dataclass
class Member:
    """One configuration being trained: a single run has one, a cohort (i2v/cohort.py) one per member."""

    cfg: ExperimentCfg  # the member's solo config
    model: VideoMethod  # shares the backbone with the other members
    forward: Callable  # the model, its DDP wrapper, or the joint DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: dict | None = None  # cohorts: the member's own torch RNG states (dropout draws as in its solo run)
    status: str = "training"  # "training", "stopped" (in-cohort halving) or "diverged" (non-finite gradient)
    stopped_at: int | None = None  # epoch (stopped) or global step (diverged)
    last: dict = field(default_factory=dict)  # the member's latest epoch metrics
    task: object = None  # its task (`i2v.tasks`): the loss reads the member's own keys (label smoothing)


class Trainer:
    """The state of one worker: the members (one, or a cohort's) on one backbone, their step functions, metrics. What
    a batch holds, the loss and the evaluation come from the task (`i2v.tasks`)."""

    def __init__(self, cfg: ExperimentCfg, device: torch.device, rank: int, world: int, steps_per_epoch: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.steps_per_epoch = steps_per_epoch
        self.opt_steps_per_epoch = math.ceil(steps_per_epoch / cfg.train.accum_steps)  # the last window may be short
        self.zero3 = cfg.backbone.partition == "zero3"
        self.task = get_task(cfg)
        self.cohort = bool(cfg.train.cohort)
        seed_all(cfg.train.seed)  # identical trainable init on every rank
        if self.zero3:
            from i2v.train import deepspeed as ds

            ds.init_distributed("nccl" if device.type == "cuda" else "gloo")
            backbone = ds.build_partitioned_backbone(cfg)
        else:
            backbone = load_backbone(cfg.backbone)
        self.backbone = backbone
        init_rng = ckpt.rng_state()
        models = []
        for member in member_configs(cfg):
            ckpt.set_rng_state(init_rng)  # every member starts from the random state its solo run builds it in
            task = get_task(member)
            model = task.build_model(member, backbone)
            if getattr(member.method, "sync_bn", False):  # batch statistics over all ranks (same state dict as BN)
                for name, child in model.named_children():
                    if name != "backbone":
                        setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
            models.append((member, task, model))
        self.engine = None  # joint ZeRO-3 engine (recipe B)
        self.members: list[Member] = []
        if self.zero3 and not models[0][2].backbone_no_grad:  # never a cohort (members are side networks)
            from i2v.train import deepspeed as ds

            model = models[0][2]
            self.engine, optimizer, scheduler = ds.joint_engine(
                model,
                build_optimizer(model, cfg.train),
                lambda opt: build_scheduler(opt, cfg.train, self.opt_steps_per_epoch),
                cfg,
            )
            self.members.append(Member(cfg, model, self.engine, optimizer, scheduler, task=self.task))
        else:
            if self.zero3:
                from i2v.train import deepspeed as ds

                ds.side_engine(backbone, cfg)  # recipe A: hooks gather the backbone block by block
            else:
                backbone.to(device)
            for member, task, model in models:
                self.members.append(self._side_member(member, task, model))
        self.autocast = autocast_for(device, backbone.dtype)
        self.step, self.step_in_epoch = 0, 0

    def _side_member(self, cfg: ExperimentCfg, task, model: VideoMethod) -> Member:
        """A member whose trainable part trains beside the frozen backbone (in DDP when there are several ranks)."""
        for p in model.trainable_parameters():  # e.g. ZeroI2V's ln_post in a bf16 tower: AdamW needs fp32
            p.data = p.data.float()
        for name, child in model.named_children():
            if name != "backbone":
                child.to(self.device)
        forward = model
        if self.world > 1:
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in model.named_buffers() if n.startswith("backbone.")]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, self.opt_steps_per_epoch)
        return Member(cfg, model, forward, optimizer, scheduler, task=task)

    # The single member of a run that is not a cohort.
    model = property(lambda self: self.members[0].model)
    forward = property(lambda self: self.members[0].forward)
    optimizer = property(lambda self: self.members[0].optimizer)
    scheduler = property(lambda self: self.members[0].scheduler)

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.status == "training"]

    def seed_members(self) -> None:
        """Cohorts: every member's RNG stream starts from the current global state, as its solo run's would."""
        if self.cohort:
            state = ckpt.rng_state()
            for m in self.members:
                m.rng = {k: v for k, v in state.items() if k in ("torch", "cuda")}

    @contextlib.contextmanager
    def member_rng(self, m: Member) -> Iterator[None]:
        """Cohorts: draws inside the block (dropout) come from the member's own stream; the global one is untouched."""
        if not self.cohort:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ckpt.set_rng_state(m.rng)
            yield
            m.rng = {k: v for k, v in ckpt.rng_state().items() if k in ("torch", "cuda")}

    # -- one optimisation step ------------------------------------------------------------------------------------
    def train_step(self, inputs, target, boundary: bool, window: int | None = None) -> list[tuple[float, dict] | None]:
        """One micro-batch (`task.prepare`'s inputs and target) for every member still training, one backbone
        forward for all of them; each optimizer steps at `boundary` with the gradient of the mean loss over the
        window. `window`: micro-batches in this accumulation window (the last one of an epoch may be shorter than
        `train.accum_steps`).

        Returns:
            Per member: (loss, the task's per-batch sums), or None for a member that no longer trains.
        """
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)  # one tensor: a classification clip batch
        out: list[tuple[float, dict] | None] = [None] * len(self.members)
        with self.backbone.shared_outputs():
            for i, m in enumerate(self.members):
                if m.status == "training":
                    with self.member_rng(m):
                        out[i] = self._member_step(m, inputs, target, boundary, window or self.cfg.train.accum_steps)
        return out

    def _member_step(self, m: Member, inputs: tuple, target, boundary: bool, window: int) -> tuple[float, dict]:
        ddp = isinstance(m.forward, torch.nn.parallel.DistributedDataParallel)
        # DDP all-reduces gradients only at the window's last micro-batch; the others accumulate locally.
        with m.forward.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with self.autocast:
                loss, stats = m.task.loss(m.forward(*inputs), target)
            if self.engine is not None:  # DeepSpeed owns accumulation, clipping, the optimizer and the schedule
                self.engine.set_gradient_accumulation_boundary(boundary)  # our windows, not its own micro-step count
                # Divided by the actual window, not by its gradient_accumulation_steps (a short last window of an
                # epoch would be under-weighted).
                self.engine.backward(loss / window, scale_wrt_gas=False)
                self.engine.step()
            else:
                (loss / window).backward()
        if self.engine is None and boundary:
            params = m.model.trainable_parameters()
            clip = m.cfg.train.grad_clip
            if clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
            elif self.cohort:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # After DDP's all-reduce every rank holds the same gradient, so every rank drops the same member.
            if self.cohort and not torch.isfinite(norm):
                m.status, m.stopped_at = "diverged", self.step + 1
                _logger.warning("cohort member %d diverged at step %d", self.members.index(m), m.stopped_at)
            else:
                m.optimizer.step()
                m.scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
        return loss.item(), stats

    def sync_buffers(self) -> None:
        """Rank 0's buffers outside the frozen backbone (BatchNorm statistics) on every rank. DDP broadcasts buffers
        only at the start of a forward, so after a training step each rank holds statistics of its own data (and a
        joint DeepSpeed engine never broadcasts buffers); this runs before evaluation and checkpointing, so every rank
        evaluates the model that is saved."""
        if self.world > 1:
            for m in self.members:
                for name, buf in m.model.named_buffers():
                    if not name.startswith("backbone."):
                        dist.broadcast(buf, src=0)

    def evaluate(self, loader) -> list[dict | None]:
        """Validation metrics of every member still training (None for the others), one backbone forward per batch."""
        self.sync_buffers()
        active = self.active
        for m in active:
            m.model.eval()
        forwards = [self.engine if self.engine is not None else m.model for m in active]  # not DDP (no broadcasts)
        kwargs = dict(mean=self.backbone.mean, std=self.backbone.std, lockstep=self.zero3, autocast=self.autocast)
        with self.backbone.shared_outputs():
            if self.cohort:  # classification only (validated): every member on each batch, one backbone forward
                metrics = evaluate_many(forwards, loader, self.cfg.data.num_classes, self.device, **kwargs)
            else:
                metrics = [self.task.evaluate(forwards[0], loader, self.device, **kwargs)]
        for m in active:
            m.model.train()
        by_member = dict(zip(map(id, active), metrics, strict=True))
        return [by_member.get(id(m)) for m in self.members]


def _maybe_inject_fault(cfg: ExperimentCfg, run_dir: Path, step: int, rank: int, world: int) -> None:
    """`train.fail_at_step`: the last rank dies once (a marker file makes it one-shot), for fault-tolerance drills."""
    if step != cfg.train.fail_at_step or rank != world - 1:
        return
    marker = run_dir / "fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected fault at step {step} on rank {rank} (train.fail_at_step)")


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from i2v.console import configure

    configure(config.get("verbose", False))  # this worker is its own process: console filters apply here too
    cfg = ExperimentCfg.from_dict(config["cfg"])
    run_dir = Path(config["run_dir"])
    if Path(config.get("cwd", "")).is_dir():  # relative paths in the config mean what they meant to the driver
        os.chdir(config["cwd"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Set per worker, never cluster-wide: a GPU-less process told DS_ACCELERATOR=cuda still picks cuda + NCCL.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    task = get_task(cfg)
    steps = task.steps_per_epoch(cfg.data, world)
    # DeepSpeed print()s "DeepSpeed ... op built successfully" while it sets up (Ray tees print to stdout).
    with contextlib.redirect_stdout(sys.stdout if config.get("verbose") else io.StringIO()):
        t = Trainer(cfg, device, rank, world, steps)
    start_epoch, skip_steps = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load(t, Path(d))
        start_epoch, skip_steps = state["epoch"], state["step_in_epoch"]
        t.step = state["step"]
        if rank == 0:
            _logger.info("resumed from %s at epoch %d step %d", checkpoint.path, start_epoch, t.step)

    mean, std = t.backbone.mean, t.backbone.std
    val_loader = task.eval_loader(cfg.data, rank=rank, world_size=world) if cfg.data.val_shards else None
    writer = None
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    for m in t.members:
        m.model.train()
    K = len(t.members)
    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeded per (seed, epoch, rank): a run resumed at an epoch boundary replays exactly what an uninterrupted one
        # would. A partial epoch (mid-epoch checkpoint) goes on from the checkpoint's RNG state instead.
        if not skip_steps:
            seed_all(cfg.train.seed * 1_000_003 + epoch * 1_009 + rank)
            t.seed_members()
        remaining = steps - skip_steps
        loader = task.train_loader(
            cfg.data,
            rank=rank,
            world_size=world,
            seed=cfg.train.seed + 7_919 * skip_steps,
            epoch=epoch,
        )
        bar = None
        if rank == 0 and config.get("progress"):
            from tqdm import tqdm

            bar = tqdm(total=remaining, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", mininterval=10)
        sums: list[dict[str, float]] = [{"loss": 0.0, "n": 0.0} for _ in range(K)]  # per member: loss x n, stats, n
        clips = 0.0
        started = time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= remaining or not t.active:
                break
            t.step_in_epoch = skip_steps + i + 1
            _maybe_inject_fault(cfg, run_dir, t.step, rank, world)
            accum = cfg.train.accum_steps
            boundary = t.step_in_epoch % accum == 0 or t.step_in_epoch == steps
            window = min(accum, steps - (t.step_in_epoch - 1) // accum * accum)
            inputs, target, n = task.prepare(batch, t.device, mean, std)  # uint8 on the wire, float there
            results = t.train_step(inputs, target, boundary, window)
            t.step += 1
            clips += n
            for k, r in enumerate(results):
                if r is not None:
                    for key, v in {"loss": r[0] * n, **r[1], "n": n}.items():
                        sums[k][key] = sums[k].get(key, 0.0) + v
            losses = {k: r[0] for k, r in enumerate(results) if r is not None}
            if bar is not None:
                bar.update(1)
                if losses:  # redraw every mininterval, not every step
                    bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in losses.values()), refresh=False)
            if (
                cfg.train.checkpoint_every
                and boundary
                and t.step % cfg.train.checkpoint_every == 0
                and t.step_in_epoch < steps
            ):
                metrics = {"epoch": epoch, "step": t.step} | _keyed(t, {k: {"loss": v} for k, v in losses.items()})
                _report(t, metrics, epoch, run_dir)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - started
        # the same keys in the same order on every rank (members stop on every rank at the same step)
        *flat, clips = _all_reduce([*(v for member in sums for v in member.values()), clips], device)
        (elapsed,) = _all_reduce([elapsed], device, dist.ReduceOp.MAX)
        (peak,) = _all_reduce([peak_mem_mb(device)], device, dist.ReduceOp.MAX)
        shared = {
            "epoch": epoch + 1,
            "step": t.step,
            "train_clips_per_s": clips / max(elapsed, 1e-9),
            "peak_mem_mb": peak,
            "skipped": loader.skipped.count,
        }
        totals = iter(flat)
        for m, member_sums in zip(t.members, sums, strict=True):
            reduced = {key: next(totals) for key in member_sums}
            n = reduced.pop("n")
            if n:  # it trained this epoch: the mean loss and the task's means (train top-1, ...)
                m.last.update({key: v / n for key, v in reduced.items()}, lr=m.optimizer.param_groups[0]["lr"])
        if val_loader is not None:
            for k, (m, val) in enumerate(zip(t.members, t.evaluate(val_loader), strict=True)):
                if val is None:
                    continue
                details = {key: val.pop(key) for key in m.task.details if key in val}  # reports carry scalars only
                m.last.update(val)
                if rank == 0:
                    m.task.write_details(member_dir(run_dir, k) if t.cohort else run_dir, shared | m.last, details)
        factor = cfg.train.cohort_halving
        if factor and epoch + 1 in rungs(cfg.train.epochs, factor):  # the same decision on every rank
            keep = survivors({k: m.last["val_top1"] for k, m in enumerate(t.members) if m.status == "training"}, factor)
            for k, m in enumerate(t.members):
                if m.status == "training" and k not in keep:
                    m.status, m.stopped_at = "stopped", epoch + 1
        skip_steps = 0
        t.step_in_epoch = 0
        metrics = shared | _keyed(t, {k: m.last for k, m in enumerate(t.members)})
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(k, v, t.step)
            writer.flush()
            for k, m in enumerate(t.members):
                prefix = f"member {k} ({m.status})  " if t.cohort else ""
                _logger.info("%s%s", prefix, epoch_line(metrics | m.last, cfg.train.epochs, m.task))
        _report(t, metrics, epoch + 1, run_dir)
        if not t.active:  # a cohort whose members all diverged
            break
    if writer is not None:
        writer.close()


def member_dir(run_dir: Path, k: int) -> Path:
    """Where member k of a cohort run keeps its summary, final checkpoint and evaluation details."""
    return Path(run_dir) / "members" / f"{k:02d}"


def _keyed(t: Trainer, per_member: dict[int, dict]) -> dict:
    """Report keys: a single run's own metrics as they are; a cohort's as `m{k}/key` per member, with each member's
    status, and `val_top1` = the best member's (what Tune's scheduler ranks a cohort trial by)."""
    if not t.cohort:
        return dict(per_member.get(0, {}))
    out = {f"m{k}/{key}": v for k, d in per_member.items() for key, v in d.items()}
    for k, m in enumerate(t.members):
        out[f"m{k}/status"], out[f"m{k}/stopped_at"] = m.status, -1 if m.stopped_at is None else m.stopped_at
    scores = [m.last["val_top1"] for m in t.members if "val_top1" in m.last]
    return out | ({"val_top1": max(scores)} if scores else {})


def epoch_line(m: dict, epochs: int, task=None) -> str:
    """The one console line of an epoch, e.g. `epoch 2/4  loss 0.612  train top-1 0.703  val top-1 0.875 ...`."""
    from i2v.tasks.classification import ClassificationTask

    line = f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}  {(task or ClassificationTask).epoch_line(m)}"
    line += f"  {m['train_clips_per_s']:.1f} clips/s  peak {m['peak_mem_mb']:.0f} MB"
    return line + (f"  skipped {m['skipped']}" if m["skipped"] else "")


def _report(t: Trainer, metrics: dict, epoch: int, run_dir: Path) -> None:
    """`ray.train.report` from every rank (it is collective), with a checkpoint of what trains."""
    import ray.train

    t.sync_buffers()  # the checkpoint holds rank 0's buffers: every rank goes on with those
    with tempfile.TemporaryDirectory(dir=os.environ.get("I2V_TMPDIR")) as d:
        ckpt.save(t, Path(d), epoch=epoch)  # every rank writes files (its RNG state): Ray merges them into one
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def write_eval_details(run_dir: Path, metrics: dict, details: dict) -> None:
    """Per-class accuracy and the confusion matrix of an epoch's validation, as `run_dir/eval/epoch_NNN.json` and
    `run_dir/eval/latest.json` (too large for `ray.train.report`, which Tune copies into every result file)."""
    keys = ("epoch", "step", "val_top1", "val_top5", "val_clips")
    text = json.dumps({k: metrics[k] for k in keys if k in metrics} | details) + "\n"
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "eval" / f"epoch_{metrics['epoch']:03d}.json", text)
    atomic_write(run_dir / "eval" / "latest.json", text)
