"""Checkpoints hold only what trains: trainable weights (+ non-backbone buffers), optimizer, schedule, step/epoch,
RNG and the config. The frozen backbone is never saved (it comes from `backbone.pretrained`).

Layout of a checkpoint directory:
    state.pt         rank 0: {"model": trainable_state_dict, "optimizer", "scheduler", "epoch", "step",
                     "step_in_epoch", "cfg"} (optimizer/scheduler absent under a joint ZeRO-3 engine); a cohort run
                     (train.cohort) holds {"members": [{"model", "optimizer", "scheduler", "status", "stopped_at",
                     "last"}, ...]} instead of the first three
    rng/rank_NNN.pt  every rank: its own python/numpy/torch (and CUDA) RNG states (a cohort's: also every member's
                     own stream, "members"), restored by the same rank; each rank reports its own files and Ray merges
                     them into one checkpoint directory
    engine/          joint ZeRO-3 engine only: DeepSpeed's per-rank shards of trainable weights + optimizer state
Files are written under a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE = "state.pt"


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    """Restores the generators `state` holds (all of `rng_state`, or a subset such as a cohort member's torch/CUDA)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_path(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank_{rank:03d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(t, directory: Path, epoch: int) -> None:
    """Called on every rank (a joint ZeRO-3 engine saves and gathers collectively)."""
    state = {
        "epoch": epoch,
        "step": t.step,
        "step_in_epoch": t.step_in_epoch,
        "schedule": schedule_of(t),
        "cfg": t.cfg.to_dict(),
    }
    if t.engine is not None:
        from i2v.train import deepspeed as ds

        ds.save_engine(t.engine, directory / "engine", tag="shards")
        # One parameter at a time (a joint engine may train the whole tower: never gather it all at once).
        params = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
        model = {}
        for k, v in t.model.trainable_state_dict().items():
            with ds.gathered([params[k]] if k in params else []):
                if _rank() == 0:
                    model[k] = (params[k] if k in params else v).detach().clone().cpu()
        state["model"] = model
    else:
        members = [
            {
                "model": {k: v.detach().cpu() for k, v in m.model.trainable_state_dict().items()},
                "optimizer": m.optimizer.state_dict(),
                "scheduler": m.scheduler.state_dict(),
                "status": m.status,
                "stopped_at": m.stopped_at,
                "last": m.last,
            }
            for m in t.members
        ]
        state |= {"members": members} if t.cohort else {k: members[0][k] for k in ("model", "optimizer", "scheduler")}
    if _rank() == 0:
        atomic_save(state, directory / STATE)
    rng_path(directory, _rank()).parent.mkdir(exist_ok=True)
    members_rng = {"members": [m.rng for m in t.members]} if t.cohort else {}
    atomic_save(rng_state() | members_rng, rng_path(directory, _rank()))


def schedule_of(t) -> dict:
    """What fixes the meaning of a step: resuming with other values would replay another schedule."""
    return {"steps_per_epoch": t.steps_per_epoch, "accum_steps": t.cfg.train.accum_steps, "epochs": t.cfg.train.epochs}


def load(t, directory: Path) -> dict:
    state = torch.load(directory / STATE, map_location="cpu", weights_only=False)
    if state.get("schedule", schedule_of(t)) != schedule_of(t):
        raise ValueError(
            f"{directory}: this run was trained with {state['schedule']}, the config now gives {schedule_of(t)} "
            f"(train.epochs, train.accum_steps, data.batch_size, data.epoch_clips, train.num_workers); resume with "
            f"the same values or start a new run directory (--out)"
        )
    now = t.cfg.to_dict()
    for section in ("backbone", "method"):
        if state["cfg"][section] != now[section]:
            changed = sorted(k for k in now[section] if state["cfg"][section].get(k) != now[section][k])
            raise ValueError(
                f"{directory}: this run was trained with another {section} config (differs in {section}."
                f"{', '.join(changed)}); resume with the same config or start a new run directory (--out)"
            )
    if state["cfg"]["train"].get("cohort", []) != now["train"]["cohort"]:
        raise ValueError(
            f"{directory}: this run was trained with another train.cohort ({state['cfg']['train'].get('cohort', [])}"
            f"); resume with the same members or start a new run directory (--out)"
        )
    if t.engine is not None:
        from i2v.train import deepspeed as ds

        ds.load_engine(t.engine, directory / "engine", tag="shards")
    else:
        for m, saved in zip(t.members, state["members"] if t.cohort else [state], strict=True):
            m.model.load_trainable_state_dict(saved["model"])
            m.optimizer.load_state_dict(saved["optimizer"])
            m.scheduler.load_state_dict(saved["scheduler"])
            m.status, m.stopped_at, m.last = (
                saved.get("status", "training"),
                saved.get("stopped_at"),
                saved.get("last", {}),
            )
    rng = rng_path(directory, _rank())
    if not rng.is_file():
        raise FileNotFoundError(f"{directory}: no RNG state for rank {_rank()} ({rng.relative_to(directory)})")
    rng = torch.load(rng, weights_only=False)  # holds numpy RNG state
    set_rng_state(rng)
    for m, member_rng in zip(t.members, rng.get("members", []), strict=False):
        m.rng = member_rng
    return state


def load_trainable(path: str | Path) -> tuple[dict, dict]:
    """(trainable state dict, config dict) from a checkpoint directory or its state.pt, for eval/predict/export."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist (expected a checkpoint directory or its {STATE})")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "members" in state:
        raise ValueError(
            f"--checkpoint: {path} holds a whole cohort ({len(state['members'])} members); pass one member's "
            f"checkpoint, <run dir>/members/NN/final.pt"
        )
    return state["model"], state["cfg"]
