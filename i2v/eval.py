"""Multi-view evaluation and prediction: `i2v eval`, `i2v predict`, and the validation pass of training.

A batch of videos arrives as uint8 (B, V, T, C, H, W) with V = clips x crops views; it is copied to the device and
normalised there (`i2v.data.transforms.normalize`), the model sees (B*V, T, C, H, W) and the softmax is averaged over
views (EVL / mmaction2 `average_clips='prob'`).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from i2v.config import ConfigError, ExperimentCfg
from i2v.data.transforms import normalize
from i2v.files import atomic_savefig, atomic_write
from i2v.methods import VideoMethod, create_model


@torch.no_grad()
def view_probs(forward: Callable, video: torch.Tensor, autocast=None) -> torch.Tensor:
    """(B, V, T, C, H, W) -> class probabilities (B, K) averaged over the V views."""
    B, V = video.shape[:2]
    with autocast or contextlib.nullcontext():
        logits = forward(video.flatten(0, 1))
    return logits.float().softmax(-1).unflatten(0, (B, V)).mean(1)


@torch.no_grad()
def evaluate(forward: Callable, batches: Iterable, num_classes: int, device: torch.device, **kwargs) -> dict:
    """Top-1 / top-5 / per-class accuracy and the confusion matrix of one model, summed over all ranks (see
    `evaluate_many` for the arguments)."""
    return evaluate_many([forward], batches, num_classes, device, **kwargs)[0]


@torch.no_grad()
def evaluate_many(
    forwards: Sequence[Callable],
    batches: Iterable,
    num_classes: int,
    device: torch.device,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    lockstep: bool = False,
    autocast=None,
) -> list[dict]:
    """The metrics of `evaluate` for several models on one pass over the batches (a cohort's members: each batch is
    read and normalised once, and under `VideoBackbone.shared_outputs` the backbone runs once for all of them).

    Args:
        forwards: The models (or their engines).
        batches: (video uint8 (B, V, T, C, H, W), label (B,)) pairs as the eval loader yields them; each rank passes
            its own share.
        num_classes: K.
        device: Where the models run.
        mean: The backbone's input mean (`model.backbone.mean`), for `normalize` on the device.
        std: The backbone's input std.
        lockstep: Every rank runs the same number of forwards (ZeRO-3: forwards are collectives); a rank whose share
            is exhausted runs dummy batches until all are.
        autocast: Autocast context for the forward.

    Returns:
        One dict per model: `val_top1`, `val_top5`, `val_clips`, `val_per_class`, `confusion`.
    """
    K, M = num_classes, len(forwards)
    # Counts live on the device: NCCL all-reduces no CPU tensors.
    confusion = torch.zeros(M, K, K, dtype=torch.float64, device=device)
    top5 = torch.zeros(M, dtype=torch.float64, device=device)
    it = iter(batches)
    while True:
        batch = next(it, None)
        if lockstep:  # [has a batch, its shape]: MAX over ranks says whether to go on, and the dummy's shape
            shape = [1.0, 1, *batch[0].shape[1:]] if batch is not None else [0.0] * 7
            info = torch.tensor(shape, dtype=torch.float64, device=device)
            dist.all_reduce(info, op=dist.ReduceOp.MAX)
            if not info[0]:
                break
            if batch is None:
                dummy = torch.zeros(info[1:].long().tolist(), device=device)
                for forward in forwards:
                    view_probs(forward, dummy, autocast)
                continue
        elif batch is None:
            break
        video = normalize(batch[0].to(device, non_blocking=True), mean, std)
        label = batch[1].long().to(device, non_blocking=True)
        ones = torch.ones(len(label), dtype=torch.float64, device=device)
        for i, forward in enumerate(forwards):
            probs = view_probs(forward, video, autocast)
            confusion[i].index_put_((label, probs.argmax(-1)), ones, accumulate=True)
            top5[i] += (probs.topk(min(5, K), -1).indices == label[:, None]).any(-1).sum()
    if dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(top5)
    out = []
    for c, t5 in zip(confusion.cpu(), top5.cpu().tolist(), strict=True):
        n = c.sum().item()
        out.append(
            {
                "val_top1": c.diag().sum().item() / max(n, 1),
                "val_top5": t5 / max(n, 1),
                "val_clips": int(n),
                "val_per_class": (c.diag() / c.sum(1).clamp(min=1)).tolist(),
                "confusion": c.long().tolist(),
            }
        )
    return out


def load_trained(checkpoint: str | Path, overrides: list[str] = ()) -> tuple[VideoMethod, ExperimentCfg]:
    """The model of a training checkpoint (run dir's `final.pt`, or a checkpoint directory) in eval mode: frozen
    backbone from `backbone.pretrained`, trainable weights from the checkpoint."""
    from i2v.config import apply_overrides
    from i2v.train.checkpoint import load_trainable

    state, cfg_dict = load_trainable(checkpoint)
    cfg = ExperimentCfg.from_dict(apply_overrides(cfg_dict, overrides), source=f"{checkpoint} + overrides")
    cfg.backbone.partition = "replicate"
    from i2v.train.loop import seed_all

    seed_all(cfg.train.seed)  # towers without backbone.pretrained are random: rebuilt as training built them
    if cfg.task == "classification":
        model = create_model(cfg)
    else:  # the task's model around the method (retrieval: + text tower, WTI)
        from i2v.backbone import load_backbone
        from i2v.tasks import get_task

        model = get_task(cfg).build_model(cfg, load_backbone(cfg.backbone))
    model.load_trainable_state_dict(state)
    return model.eval(), cfg


def labels_for(cfg: ExperimentCfg) -> list[str]:
    from i2v.data import read_label_map

    for shards in (cfg.data.train_shards, cfg.data.val_shards):
        with contextlib.suppress(Exception):
            return read_label_map(shards)
    return [str(i) for i in range(cfg.data.num_classes)]


def run_eval(checkpoint: str, config: str | None, overrides: list[str], out: str | None) -> dict:
    """`i2v eval`: multi-view testing of a checkpoint on `data.val_shards`; writes metrics JSON + confusion PNG."""
    from i2v.config import load_config
    from i2v.data import build_eval_loader

    model, cfg = load_trained(checkpoint, overrides)
    if config is not None:  # data/eval settings (views, shards) may come from another experiment file
        cfg.data = load_config(config, overrides).data
    from i2v.train.loop import autocast_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    autocast = autocast_for(device, model.backbone.dtype)
    try:
        loader = build_eval_loader(cfg.data, captions=cfg.task == "retrieval")
    except (OSError, ValueError) as e:  # shards that do not exist, an empty data.val_shards, a class-count mismatch
        raise ConfigError(f"data.val_shards: {e}") from None
    mean, std = model.backbone.mean, model.backbone.std
    if cfg.task == "retrieval":
        return _run_retrieval_eval(
            model, cfg, loader, device, autocast, out or Path(checkpoint).resolve().parent / "eval"
        )
    metrics = evaluate(model, loader, cfg.data.num_classes, device, mean=mean, std=std, autocast=autocast)
    metrics["labels"] = labels_for(cfg)
    metrics["views"] = cfg.data.test_clips * cfg.data.test_crops
    metrics["skipped"] = loader.skipped.to_dict()
    out_dir = Path(out or Path(checkpoint).resolve().parent / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    plot_confusion(metrics["confusion"], metrics["labels"], out_dir / "confusion.png")
    metrics["out"] = str(out_dir)
    return metrics


def _run_retrieval_eval(model, cfg: ExperimentCfg, loader, device, autocast, out: str | Path) -> dict:
    """`i2v eval` of a retrieval checkpoint: the ten figures, counts and chance on data.val_shards, as
    OUT/summary.json (and the similarity matrix with `retrieval.save_sim`); OUT defaults to <checkpoint dir>/eval."""
    from i2v.tasks.retrieval import evaluate as retrieval_evaluate
    from i2v.tasks.retrieval import write_sim

    mean, std = model.backbone.mean, model.backbone.std
    metrics, sim, ids = retrieval_evaluate(
        model, loader, device, mean=mean, std=std, rcfg=cfg.retrieval, autocast=autocast
    )
    metrics |= {"task": "retrieval", "shards": cfg.data.val_shards, "skipped": loader.skipped.to_dict()}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "summary.json", json.dumps(metrics, indent=1) + "\n")
    if cfg.retrieval.save_sim:
        write_sim(out_dir / "sim.npy", sim, ids)
    metrics["out"] = str(out_dir)
    return metrics


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(confusion)
    fig, ax = plt.subplots(figsize=(2 + 0.25 * K, 2 + 0.25 * K) if K > 8 else (4, 4))
    ax.imshow(confusion, cmap="Blues")
    if K <= 40:
        ax.set_xticks(range(K), labels[:K], rotation=90, fontsize=7)
        ax.set_yticks(range(K), labels[:K], fontsize=7)
    if K <= 12:
        for i in range(K):
            for j in range(K):
                ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    atomic_savefig(fig, path)


def predict(checkpoint: str, videos: list[str], topk: int = 5, overrides: list[str] = ()) -> list[dict]:
    """`i2v predict`: top-k labels with probabilities for each video file (multi-view as configured)."""
    from i2v.data.wds import ClipSpec, eval_transform_for
    from i2v.train.loop import autocast_for

    model, cfg = load_trained(checkpoint, overrides)
    d = cfg.data
    spec = ClipSpec(
        d.frames,
        d.sampler,
        d.stride,
        train=False,
        clips=d.test_clips,
        transform=eval_transform_for(d),
    )
    labels = labels_for(cfg)
    results = []
    for path in videos:
        ext = Path(path).suffix.lstrip(".").lower() or "mp4"
        try:
            video, _ = spec({ext: Path(path).read_bytes(), "cls": b"0"}, random.Random(0))
        except (OSError, ValueError) as e:
            results.append({"video": path, "error": f"{type(e).__name__}: {e}"})
            continue
        video = normalize(video[None], model.backbone.mean, model.backbone.std)  # uint8 -> the model's float input
        probs = view_probs(model, video, autocast_for(torch.device("cpu"), model.backbone.dtype))[0]
        p, i = probs.topk(min(topk, len(probs)))
        results.append({"video": path, "top": [(labels[k], float(v)) for v, k in zip(p.tolist(), i.tolist())]})
    return results
