"""Tasks: what a batch holds, the model built around a method, the loss and the evaluation.

A task is independent of where the model runs: the trainer (`i2v/train/loop.py`) owns the placement (replicated +
DDP, ZeRO-3 side engine, ZeRO-3 joint engine) and calls the task for everything else, so a new task is one more
module here, never a second copy of the placement branches.

    task = get_task(cfg)                                    # classification or retrieval
    model = task.build_model(cfg, backbone)                 # a VideoMethod (the registry's, or one wrapping it)
    loader = task.train_loader(cfg.data, rank=r, world_size=w, seed=s, epoch=e)
    inputs, target, n = task.prepare(batch, device, mean, std)        # model inputs on the device
    loss, stats = task.loss(model_forward(*inputs), target)           # stats: sums over this rank's samples
    metrics = task.evaluate(forward, val_loader, device, mean=..., std=..., lockstep=..., autocast=...)
"""

from __future__ import annotations

from i2v.config import ExperimentCfg


def get_task(cfg: ExperimentCfg):
    """The task object of `cfg.task`."""
    if cfg.task == "retrieval":
        from i2v.tasks.retrieval import RetrievalTask

        return RetrievalTask(cfg)
    from i2v.tasks.classification import ClassificationTask

    return ClassificationTask(cfg)


__all__ = ["get_task"]
