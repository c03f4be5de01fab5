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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from i2v.backbone import load_backbone
from i2v.config import ExperimentCfg
from i2v.files import atomic_write
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


class Trainer:
    """The state of one worker: model, the three partition modes' step functions, metrics. What a batch holds, the
    loss and the evaluation come from the task (`i2v.tasks`)."""

    def __init__(self, cfg: ExperimentCfg, device: torch.device, rank: int, world: int, steps_per_epoch: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.steps_per_epoch = steps_per_epoch
        self.opt_steps_per_epoch = math.ceil(steps_per_epoch / cfg.train.accum_steps)  # the last window may be short
        self.zero3 = cfg.backbone.partition == "zero3"
        self.task = get_task(cfg)
        seed_all(cfg.train.seed)  # identical trainable init on every rank
        if self.zero3:
            from i2v.train import deepspeed as ds

            ds.init_distributed("nccl" if device.type == "cuda" else "gloo")
            backbone = ds.build_partitioned_backbone(cfg)
        else:
            backbone = load_backbone(cfg.backbone)
        model = self.task.build_model(cfg, backbone)
        if getattr(cfg.method, "sync_bn", False):  # batch statistics over all ranks (same state dict as BatchNorm)
            for name, child in model.named_children():
                if name != "backbone":
                    setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
        self.model = model
        self.engine = None  # joint ZeRO-3 engine (recipe B)
        if self.zero3 and not model.backbone_no_grad:
            from i2v.train import deepspeed as ds

            self.engine, self.optimizer, self.scheduler = ds.joint_engine(
                model,
                build_optimizer(model, cfg.train),
                lambda opt: build_scheduler(opt, cfg.train, self.opt_steps_per_epoch),
                cfg,
            )
            self.forward = self.engine
        else:
            for p in model.trainable_parameters():  # e.g. ZeroI2V's ln_post in a bf16 tower: AdamW needs fp32
                p.data = p.data.float()
            if self.zero3:
                from i2v.train import deepspeed as ds

                ds.side_engine(model.backbone, cfg)  # recipe A: hooks gather the backbone block by block
                for name, child in model.named_children():
                    if name != "backbone":
                        child.to(device)
            else:
                model.to(device)
            self.forward = model
            if world > 1:
                frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
                frozen += [n for n, _ in model.named_buffers() if n.startswith("backbone.")]
                torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
                self.forward = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            self.optimizer = build_optimizer(model, cfg.train)
            self.scheduler = build_scheduler(self.optimizer, cfg.train, self.opt_steps_per_epoch)
        self.autocast = autocast_for(device, model.backbone.dtype)
        self.step, self.step_in_epoch = 0, 0

    # -- one optimisation step ------------------------------------------------------------------------------------
    def train_step(self, inputs: tuple, target, boundary: bool, window: int | None = None) -> tuple[float, dict]:
        """One micro-batch (`task.prepare`'s inputs and target); the optimizer steps at `boundary` with the gradient
        of the mean loss over the window. `window`: micro-batches in this accumulation window (the last one of an
        epoch may be shorter than `train.accum_steps`). Returns the loss and the task's per-batch sums."""
        window = window or self.cfg.train.accum_steps
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)  # one tensor: a classification clip batch
        ddp = isinstance(self.forward, torch.nn.parallel.DistributedDataParallel)
        # DDP all-reduces gradients only at the window's last micro-batch; the others accumulate locally.
        with self.forward.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with self.autocast:
                loss, stats = self.task.loss(self.forward(*inputs), target)
            if self.engine is not None:  # DeepSpeed owns accumulation, clipping, the optimizer and the schedule
                self.engine.set_gradient_accumulation_boundary(boundary)  # our windows, not its own micro-step count
                # Divided by the actual window, not by its gradient_accumulation_steps (a short last window of an
                # epoch would be under-weighted).
                self.engine.backward(loss / window, scale_wrt_gas=False)
                self.engine.step()
            else:
                (loss / window).backward()
        if self.engine is None and boundary:
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), stats

    def sync_buffers(self) -> None:
        """Rank 0's buffers outside the frozen backbone (BatchNorm statistics) on every rank. DDP broadcasts buffers
        only at the start of a forward, so after a training step each rank holds statistics of its own data (and a
        joint DeepSpeed engine never broadcasts buffers); this runs before evaluation and checkpointing, so every rank
        evaluates the model that is saved."""
        if self.world > 1:
            for name, buf in self.model.named_buffers():
                if not name.startswith("backbone."):
                    dist.broadcast(buf, src=0)

    def evaluate(self, loader) -> dict:
        self.sync_buffers()
        self.model.eval()
        metrics = self.task.evaluate(
            self.engine if self.engine is not None else self.model,  # not through DDP (no buffer broadcasts)
            loader,
            self.device,
            mean=self.model.backbone.mean,
            std=self.model.backbone.std,
            lockstep=self.zero3,
            autocast=self.autocast,
        )
        self.model.train()
        return metrics


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

    mean, std = t.model.backbone.mean, t.model.backbone.std
    val_loader = task.eval_loader(cfg.data, rank=rank, world_size=world) if cfg.data.val_shards else None
    writer = None
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    t.model.train()
    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeded per (seed, epoch, rank): a run resumed at an epoch boundary replays exactly what an uninterrupted one
        # would. A partial epoch (mid-epoch checkpoint) goes on from the checkpoint's RNG state instead.
        if not skip_steps:
            seed_all(cfg.train.seed * 1_000_003 + epoch * 1_009 + rank)
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
        loss_sum = clips = 0.0
        sums: dict[str, float] = {}
        started = time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= remaining:
                break
            t.step_in_epoch = skip_steps + i + 1
            _maybe_inject_fault(cfg, run_dir, t.step, rank, world)
            accum = cfg.train.accum_steps
            boundary = t.step_in_epoch % accum == 0 or t.step_in_epoch == steps
            window = min(accum, steps - (t.step_in_epoch - 1) // accum * accum)
            inputs, target, n = task.prepare(batch, t.device, mean, std)  # uint8 on the wire, float there
            loss, stats = t.train_step(inputs, target, boundary, window)
            t.step += 1
            loss_sum += loss * n
            sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
            clips += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # redraw every mininterval, not every step
            if (
                cfg.train.checkpoint_every
                and boundary
                and t.step % cfg.train.checkpoint_every == 0
                and t.step_in_epoch < steps
            ):
                metrics = {"epoch": epoch, "step": t.step, "loss": loss}
                _report(t, metrics, epoch, run_dir)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - started
        loss_sum, clips, *totals = _all_reduce([loss_sum, clips, *sums.values()], device)
        (elapsed,) = _all_reduce([elapsed], device, dist.ReduceOp.MAX)
        (peak,) = _all_reduce([peak_mem_mb(device)], device, dist.ReduceOp.MAX)
        metrics = {
            "epoch": epoch + 1,
            "step": t.step,
            "loss": loss_sum / max(clips, 1),
            **{k: v / max(clips, 1) for k, v in zip(sums, totals)},
            "train_clips_per_s": clips / max(elapsed, 1e-9),
            "peak_mem_mb": peak,
            "lr": t.optimizer.param_groups[0]["lr"],
            "skipped": loader.skipped.count,
        }
        if val_loader is not None:
            metrics.update(t.evaluate(val_loader))
            details = {k: metrics.pop(k) for k in task.details if k in metrics}  # reports carry scalars only
            if rank == 0:
                task.write_details(run_dir, metrics, details)
        skip_steps = 0
        t.step_in_epoch = 0
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(k, v, t.step)
            writer.flush()
            _logger.info("%s", epoch_line(metrics, cfg.train.epochs, task))
        _report(t, metrics, epoch + 1, run_dir)
    if writer is not None:
        writer.close()


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
