"""Text-video retrieval as Side4Video's Retrieval code does it: CLIP4Clip + DRL's weighted token interaction (WTI).
Reference facts: shared/RETRIEVAL_FEWSHOT.md Part 1.

    video (B, T, C, H, W) --method (num_classes=0)--> frames (B, T, E)       e.g. Side4Video's per-frame output
    caption ids (N, L) --open_clip text tower--> tokens (N, L, E), mask (N, L), <|endoftext|> row (N, E)
    wti:  w_t = softmax over valid tokens of MLP_t(tokens), w_v = softmax over frames of MLP_v(frames) (all frames);
          s_ij = <t_i, v_j> of L2-normalised features, padded tokens 0;
          sim = (sum_i w_t,i max_j s_ij + sum_j w_v,j max_i s_ij) / 2
    mean: sim = <normalise(eot), normalise(mean_T normalise(frames))> (CLIP4Clip meanP)

Training: one (video, caption) pair per sample; tokens, masks, token weights and frames are all-gathered over the
workers with gradients (`torch.distributed.nn.functional.all_gather`), the loss is the symmetric InfoNCE of
exp(logit_scale) * sim over the global batch, and the parameter gradients equal those of one process on the whole
batch (tests/test_retrieval.py). The reference's own AllGather hands each rank only its slice of its own gradient,
which under DDP's averaging scales the encoders' gradients by 1/world relative to the WTI MLPs'; i2v does not.
Captions of the same video in one batch are negatives, as in the reference.

Evaluation: every test video and every caption is encoded once; each rank scores its own captions against all
videos in blocks of `retrieval.eval_block` (never the token x frame tensor of the whole matrix), and the
(captions x videos) rows are gathered. T2V: rank of each caption's video; V2T: each candidate video's caption group
scores the max over its captions (the reference's multi-sentence convention), rank of the query's own group.
R@K = % of ranks < K, MdR = median rank + 1, MnR = mean rank + 1 (0-based ranks = count of strictly higher scores).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from i2v.config import DataCfg, ExperimentCfg
from i2v.data.transforms import normalize
from i2v.methods import VideoMethod, create_method

_logger = logging.getLogger(__name__)

METRIC_KEYS = ("r1", "r5", "r10", "mdr", "mnr")
SUMMARY_KEYS = tuple(f"{d}_{k}" for d in ("t2v", "v2t") for k in METRIC_KEYS)


# ----------------------------------------------------------------------------------------------------------------------
# Model


class TokenWeights(nn.Module):
    """DRL's weight MLP: Linear(E, E) - ReLU - Linear(E, 1), one logit per token or frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


class RetrievalModel(VideoMethod):
    """A registered method's per-frame video embedding (built with num_classes=0) + the open_clip text tower + WTI.

    The frozen backbone is registered once, here (`backbone`); the method keeps a plain reference to it, so state
    dicts, `.to()`, DDP's ignore list and ZeRO-3 see one tower. `forward(video, text)` returns a dict of features
    (see `encode`); the similarity and the loss are computed on them after the all-gather.

    Trainable: the method's own modules and the WTI MLPs at the base lr; the CLIP parts the reference trains at
    lr x coef_lr (text tower, the frame projection's ln_post / proj copies, logit_scale) per `retrieval.clip_train`.
    """

    def __init__(self, cfg: ExperimentCfg, backbone, text, logit_scale: torch.Tensor):
        super().__init__(cfg.method, backbone, num_classes=0, num_frames=cfg.data.frames)
        method = create_method(cfg.method, backbone, num_classes=0, num_frames=cfg.data.frames)
        if not hasattr(method, "frame_proj"):
            raise NotImplementedError(
                f"method.name: {cfg.method.name} has no retrieval output (per-frame embeddings); task: retrieval "
                f"works with side4video, linear_probe and full_finetune"
            )
        del method._modules["backbone"]
        method.__dict__["backbone"] = backbone  # a reference, not a second registration
        self.method = method
        self.text = text
        self.rcfg = cfg.retrieval
        dim = method.frame_proj.proj.shape[1]
        device = method.frame_proj.proj.device
        self.wti = nn.ModuleDict(
            {"text": TokenWeights(dim), "video": TokenWeights(dim)} if self.rcfg.interaction == "wti" else {}
        ).to(device)
        # shape (1,), not 0-dim: DeepSpeed's ZeRO-3 partitioning broadcasts fail on 0-dim parameters
        self.logit_scale = nn.Parameter(logit_scale.detach().float().reshape(1).to(device))
        # A partitioned text tower (zero3) that trains cannot sit in an optimizer-less engine: one joint engine.
        self.backbone_no_grad = method.backbone_no_grad and cfg.backbone.partition != "zero3"
        if cfg.backbone.partition == "zero3":  # DeepSpeed partitions a parameter through a flat byte view
            for p in method.parameters():  # (Side4Video keeps its temporal convs channels-last for DDP)
                p.data = torch.empty(p.shape, dtype=p.dtype, device=p.device).copy_(p.data)  # row-major strides
        if not method.backbone_no_grad:  # its own ln_post / proj go unused (frame_proj copies them): no DDP grad
            backbone.visual.ln_post.requires_grad_(False)
            backbone.visual.proj.requires_grad_(False)
        clip = self.clip_parameters()
        text.tower.requires_grad_(False)
        for p in clip.values():
            p.requires_grad_(self.rcfg.clip_train != "frozen")

    def clip_parameters(self) -> dict[str, nn.Parameter]:
        """The CLIP parts (name -> parameter) that `retrieval.clip_train` / `coef_lr` govern; with a method that
        back-propagates into the vision tower (full_finetune: CLIP4Clip), the tower's blocks and embeddings too."""
        vision = not self.method.backbone_no_grad
        unused = ("backbone.visual.ln_post.", "backbone.visual.proj")
        return {
            n: p
            for n, p in self.named_parameters()
            if n.startswith(("text.", "method.frame_proj."))
            or n == "logit_scale"
            or (vision and n.startswith("backbone.") and not n.startswith(unused))
        }

    def lr_scales(self) -> dict[str, float]:
        """lr factor per parameter name (train/optim.py): coef_lr for the CLIP parts under "low_lr"."""
        factor = self.rcfg.coef_lr if self.rcfg.clip_train == "low_lr" else 1.0
        inner = getattr(self.method, "lr_scales", dict)()
        return {f"method.{k}": v for k, v in inner.items()} | {n: factor for n in self.clip_parameters()}

    def no_weight_decay(self) -> set[str]:
        return {f"method.{n}" for n in self.method.no_weight_decay()} | {"text.tower.positional_embedding"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.method.set_grad_checkpointing(enable)
        self.text.tower.set_grad_checkpointing(enable)

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """Parameters read outside a call of the module that owns them (see deepspeed.joint_engine)."""
        inner = getattr(self.method, "zero3_external_parameters", lambda: [])()
        return list(inner) + [(self.text, p) for p in self.text.external_parameters()]

    def encode_video(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = self.method(video).float()  # (B, T, E)
        out = {"frames": frames}
        if "video" in self.wti:
            out["frame_w"] = self.wti["video"](frames)  # (B, T) logits, on the un-normalised features
        return out

    def encode_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, eot = self.text(text)  # (N, L, E), (N, E)
        out = {"tokens": tokens.float(), "eot": eot.float(), "mask": text != 0}
        if "text" in self.wti:
            out["token_w"] = self.wti["text"](out["tokens"])  # (N, L) logits
        return out

    def forward(self, video: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Features of a batch of clips (B, T, C, H, W) and/or caption ids (N, L), plus the clamped temperature."""
        out = {"scale": self.logit_scale.clamp(max=math.log(self.rcfg.logit_scale_max)).exp().squeeze()}
        if video is not None:
            out |= self.encode_video(video)
        if text is not None:
            out |= self.encode_text(text)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Similarity, loss, metrics (pure functions of feature dicts)


def similarity(texts: dict, videos: dict, interaction: str) -> torch.Tensor:
    """(N texts, M videos) similarity without temperature."""
    if interaction == "mean":
        v = F.normalize(F.normalize(videos["frames"], dim=-1).mean(1), dim=-1)  # (M, E)
        return F.normalize(texts["eot"], dim=-1) @ v.T
    t, v = F.normalize(texts["tokens"], dim=-1), F.normalize(videos["frames"], dim=-1)  # (N, L, E), (M, T, E)
    mask = texts["mask"]
    w_t = texts["token_w"].masked_fill(~mask, float("-inf")).softmax(-1)  # (N, L)
    w_v = videos["frame_w"].softmax(-1)  # (M, T): the reference's video mask is all ones
    s = torch.einsum("nld,mtd->nmlt", t, v) * mask[:, None, :, None].to(t.dtype)  # (N, M, L, T), padded tokens 0
    t2v = (s.amax(3) * w_t[:, None]).sum(2)  # (N, M)
    v2t = (s.amax(2) * w_v[None]).sum(2)  # (N, M)
    return (t2v + v2t) / 2


def blocked_similarity(
    texts: dict, videos: dict, interaction: str, block: int, device: torch.device | None = None
) -> torch.Tensor:
    """`similarity` computed `block` texts x `block` videos at a time on `device`; the result is on the CPU."""
    N, M = len(texts["mask"]), len(videos["frames"])
    out = torch.empty(N, M)
    for i in range(0, N, block):
        t = {k: v[i : i + block].to(device) for k, v in texts.items()}
        for j in range(0, M, block):
            v = {k: x[j : j + block].to(device) for k, x in videos.items()}
            out[i : i + block, j : j + block] = similarity(t, v, interaction).float().cpu()
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward gives each rank the sum over ranks of the gradient of its own slice (every rank
    computes the same global loss, so DDP's average of the parameter gradients is then the single-process one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks, in rank order; the backward pass sums every rank's gradient of each slice."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(out: dict, interaction: str) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE over the global batch (one caption per clip, pair i <-> i) and the number of this rank's
    captions whose own clip scores highest (in-batch T2V top-1)."""
    keys = ("tokens", "eot", "token_w", "frames", "frame_w")
    g = {k: gather_with_grad(out[k]) for k in keys if k in out}
    mask = out["mask"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        masks = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
        dist.all_gather(masks, mask.contiguous())
        mask = torch.cat(masks)
    logits = out["scale"] * similarity(g | {"mask": mask}, g, interaction)  # (N, N)
    labels = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    n = len(out["mask"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = slice(rank * n, (rank + 1) * n)
    correct = (logits[own].argmax(-1) == labels[own]).sum().item()
    return loss, correct


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where column target[i] stands in row i: (entries scoring strictly higher, other entries scoring the same)."""
    own = scores.gather(1, target[:, None])
    return (scores > own).sum(1), (scores == own).sum(1) - 1


def _summarise(ranks: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """R@1/5/10 (percent), MdR and MnR (1-based), ties broken at random in expectation: with g entries above and e
    tied, the target is equally likely at each 0-based rank g..g+e. The reference counts only the entries above, so
    a model that scores everything alike would get R@1 = 100; without exact ties the two rules agree."""
    g, e = (x.double() for x in ranks)
    out = {f"r{k}": 100.0 * ((k - g).clamp(0).minimum(e + 1) / (e + 1)).mean().item() for k in (1, 5, 10)}
    r = g + e / 2
    return out | {"mdr": float(np.median(r.numpy())) + 1, "mnr": r.mean().item() + 1}


def retrieval_metrics(sim: torch.Tensor, video_of: torch.Tensor) -> dict[str, float]:
    """T2V and V2T R@1/5/10, MdR, MnR of a (captions x videos) similarity; `video_of[c]` is caption c's video.

    V2T with several captions per video: candidate video g scores max over its captions (reference
    `tensor_video_to_text_sim`); videos without a caption are no V2T query."""
    t2v = _ranks(sim, video_of)
    M = sim.shape[1]
    groups = torch.full((M, M), float("-inf"))  # (caption group g, query video v)
    groups.scatter_reduce_(0, video_of[:, None].expand(-1, M), sim.float(), "amax", include_self=True)
    has = torch.isfinite(groups.diagonal())
    queries = torch.arange(M)[has]
    v2t = _ranks(groups.T[has], queries)
    out = {f"t2v_{k}": v for k, v in _summarise(t2v).items()} | {f"v2t_{k}": v for k, v in _summarise(v2t).items()}
    return out | {"num_videos": M, "num_captions": len(video_of), "chance_r1": 100.0 / max(M, 1)}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def _gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def encode_all(
    forward: Callable,
    batches: Iterable,
    device: torch.device,
    *,
    mean,
    std,
    max_words: int,
    lockstep: bool = False,
    autocast=None,
) -> tuple[dict, dict, list[str], list[int]]:
    """This rank's video features, caption features, video ids and, per caption, the local index of its video."""
    from i2v.text import tokenize

    videos, texts, ids, owner = [], [], [], []
    it = iter(batches)
    while True:
        batch = next(it, None)
        if lockstep:  # ZeRO-3: forwards are collectives; a rank out of data runs dummy batches until all are
            shape = [1.0, *batch[0].shape[2:]] if batch is not None else [0.0] * 5
            info = torch.tensor(shape, dtype=torch.float64, device=device)
            dist.all_reduce(info, op=dist.ReduceOp.MAX)
            if not info[0]:
                break
            if batch is None:
                with autocast or contextlib.nullcontext():
                    dummy = torch.zeros([1, *info[1:].long().tolist()], device=device)
                    forward(dummy, tokenize([""], max_words).to(device))
                continue
        elif batch is None:
            break
        video, metas = batch
        if video.shape[1] != 1:
            raise ValueError(
                f"retrieval evaluation takes one view per video, got {video.shape[1]} "
                "(data.test_clips and data.test_crops must be 1)"
            )
        video = normalize(video[:, 0].to(device, non_blocking=True), mean, std)
        captions = [c for m in metas for c in m["captions"]]
        owner += [len(ids) + i for i, m in enumerate(metas) for _ in m["captions"]]
        ids += [m["video_id"] for m in metas]
        with autocast or contextlib.nullcontext():
            out = forward(video, tokenize(captions, max_words).to(device))
        videos.append({k: out[k].float().cpu() for k in ("frames", "frame_w") if k in out})
        texts.append({k: out[k].cpu() for k in ("tokens", "eot", "mask", "token_w") if k in out})
    cat = lambda parts: {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}  # noqa: E731
    return cat(videos), cat(texts), ids, owner


def evaluate(
    forward: Callable,
    batches: Iterable,
    device: torch.device,
    *,
    mean,
    std,
    rcfg,
    lockstep: bool = False,
    autocast=None,
) -> tuple[dict, torch.Tensor, list[str]]:
    """Metrics over every rank's share of the test set, the (captions x videos) similarity and the video ids."""
    videos, texts, ids, owner = encode_all(
        forward, batches, device, mean=mean, std=std, max_words=rcfg.max_words, lockstep=lockstep, autocast=autocast
    )
    shares = _gather_objects((videos, ids))  # videos are few (frame features); captions stay on their rank
    offsets = np.cumsum([0] + [len(i) for _, i in shares])
    rank = dist.get_rank() if dist.is_initialized() else 0
    all_videos = {k: torch.cat([v[k] for v, _ in shares if v]) for k in next(v for v, _ in shares if v)}
    all_ids = [i for _, share in shares for i in share]
    rows = torch.empty(0, len(all_ids))
    if texts:
        rows = blocked_similarity(texts, all_videos, rcfg.interaction, rcfg.eval_block, device)
    parts = _gather_objects((rows, [offsets[rank] + o for o in owner]))
    sim = torch.cat([r for r, _ in parts])
    video_of = torch.tensor([o for _, own in parts for o in own], dtype=torch.long)
    return retrieval_metrics(sim, video_of), sim, all_ids


# ----------------------------------------------------------------------------------------------------------------------
# The task


def write_sim(path: Path, sim: torch.Tensor, video_ids: list[str]) -> None:
    """The (captions x videos) similarity matrix as `path` (.npy) and its column ids as sim_video_ids.json beside it,
    each written atomically."""
    import io

    from i2v.files import atomic_write

    buf = io.BytesIO()
    np.save(buf, sim.numpy())
    atomic_write(path, buf.getvalue())
    atomic_write(path.with_name("sim_video_ids.json"), json.dumps(video_ids) + "\n")


class RetrievalTask:
    name = "retrieval"
    details: tuple[str, ...] = ("sim", "sim_video_ids")  # with `retrieval.save_sim`: written, not reported

    def __init__(self, cfg: ExperimentCfg):
        self.cfg = cfg

    def build_model(self, cfg: ExperimentCfg, backbone) -> RetrievalModel:
        device = next(backbone.parameters()).device
        if cfg.backbone.partition == "zero3" and device.type != "meta" and dist.is_initialized():
            from i2v.train import deepspeed as ds

            text, scale = ds.build_partitioned_text(cfg)
        else:
            from i2v.text import load_text_tower

            text, scale = load_text_tower(cfg.backbone, cfg.retrieval.max_words, device=device)
        return RetrievalModel(cfg, backbone, text, scale)

    def steps_per_epoch(self, data: DataCfg, world_size: int) -> int:
        from i2v.data.wds import steps_per_epoch

        return steps_per_epoch(data, world_size, pairs=True)

    def train_loader(self, data: DataCfg, **kwargs):
        from i2v.data.wds import build_train_loader

        return build_train_loader(data, captions=True, **kwargs)

    def eval_loader(self, data: DataCfg, **kwargs):
        from i2v.data.wds import build_eval_loader

        return build_eval_loader(data, captions=True, **kwargs)

    def prepare(self, batch, device: torch.device, mean, std) -> tuple[tuple, None, int]:
        from i2v.text import tokenize

        video, metas = batch
        video = normalize(video.to(device, non_blocking=True), mean, std)
        text = tokenize([m["caption"] for m in metas], self.cfg.retrieval.max_words).to(device, non_blocking=True)
        return (video, text), None, len(metas)

    def loss(self, out: dict, target=None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, correct = contrastive_loss(out, self.cfg.retrieval.interaction)
        return loss, {"train_r1": float(correct)}

    def evaluate(self, forward, loader, device, **kwargs) -> dict:
        metrics, sim, ids = evaluate(forward, loader, device, rcfg=self.cfg.retrieval, **kwargs)
        out = {f"val_{k}" if k in ("num_videos", "num_captions") else k: v for k, v in metrics.items()}
        if self.cfg.retrieval.save_sim:
            out |= {"sim": sim, "sim_video_ids": ids}
        return out

    def write_details(self, run_dir: Path, metrics: dict, details: dict | None = None) -> None:
        """run_dir/eval/epoch_NNN.json (all metrics of the epoch; the driver picks the best epoch from these) and,
        with `retrieval.save_sim`, the similarity matrix with its video ids."""
        from i2v.files import atomic_write

        d = run_dir / "eval"
        d.mkdir(parents=True, exist_ok=True)
        text = json.dumps(metrics) + "\n"
        atomic_write(d / f"epoch_{metrics['epoch']:03d}.json", text)
        atomic_write(d / "latest.json", text)
        if details and "sim" in details:
            write_sim(d / f"sim_epoch_{metrics['epoch']:03d}.npy", details["sim"], details["sim_video_ids"])

    @staticmethod
    def epoch_line(m: dict) -> str:
        line = f"train in-batch R@1 {m['train_r1']:.4f}"
        if "t2v_r1" in m:
            line += f"  T2V R@1 {m['t2v_r1']:.1f}  V2T R@1 {m['v2t_r1']:.1f}  (chance {m['chance_r1']:.1f})"
        return line


# ----------------------------------------------------------------------------------------------------------------------
# Driver-side checks and summary, search


def validate_data(cfg: ExperimentCfg) -> None:
    """Before any worker starts: retrieval shards exist, are retrieval shards when their index says, and evaluation
    takes one view per video."""
    from i2v.config import ConfigError
    from i2v.data.wds import _read_sibling, expand_shards

    d = cfg.data
    if d.test_clips * d.test_crops != 1:
        raise ConfigError(
            f"data.test_clips / data.test_crops: {d.test_clips} x {d.test_crops} views; retrieval evaluates one view "
            "per video (the reference's single clip), set both to 1"
        )
    for key in ("train_shards", "val_shards"):
        pattern = getattr(d, key)
        if not pattern:
            if key == "train_shards":
                raise ConfigError("data.train_shards: empty; give the retrieval shards, e.g. data/msrvtt/train")
            continue
        try:
            expand_shards(pattern)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.{key}: {e}") from None
        try:
            task = json.loads(_read_sibling(pattern, "index.json")).get("task", "retrieval")
        except (OSError, ValueError):
            continue  # no index to compare with (remote or hand-made shards)
        if task != "retrieval":
            raise ConfigError(
                f'data.{key}: {pattern} holds {task} shards (index.json "task"); task: retrieval needs caption '
                "shards (KEY.json with video_id and captions)"
            )


def run_summary(cfg: ExperimentCfg, out: Path, metrics: dict) -> dict:
    """The summary.json figures of a retrieval run: the last epoch's ten figures at the top level, and both the
    final-epoch and the best-epoch (by T2V R@1) metrics with the split they were selected on."""
    keep = (*SUMMARY_KEYS, "chance_r1", "val_num_videos", "val_num_captions")
    epochs = []
    for path in sorted((out / "eval").glob("epoch_*.json")):
        with contextlib.suppress(ValueError, OSError):
            epochs.append(json.loads(path.read_text()))
    best = max(epochs, key=lambda m: (m.get("t2v_r1", -1), -m["epoch"]), default=None)
    pick = lambda m: {k: m[k] for k in ("epoch", *keep) if k in m} if m else None  # noqa: E731
    final = pick(metrics) if "t2v_r1" in metrics else None
    return {k: metrics.get(k) for k in keep} | {
        "task": "retrieval",
        "interaction": cfg.retrieval.interaction,
        "final_epoch": final,
        "best_epoch": pick(best),
        # the reference selects its "best model" on the test split itself; here: data.val_shards, whatever it is
        "selected_on": {"split": "data.val_shards", "shards": cfg.data.val_shards, "by": "t2v_r1"},
    }


def _cache_key(checkpoint: Path, urls: list[str], cfg: ExperimentCfg) -> str:
    import hashlib

    parts = [str(checkpoint.resolve()), str(checkpoint.stat().st_mtime_ns)]
    for url in urls:
        p = Path(url)
        parts.append(f"{url}:{p.stat().st_mtime_ns}:{p.stat().st_size}" if p.is_file() else url)
    parts.append(json.dumps([cfg.data.frames, cfg.data.size, cfg.data.sampler, cfg.data.stride]))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def search(checkpoint: str, videos: str, queries: list[str], topk: int = 5, overrides: list[str] = ()) -> dict:
    """`i2v search`: the top-k clips of retrieval shards `videos` for each text query.

    Video features are cached next to the checkpoint (`search-<key>.pt`, the key covers the checkpoint, the shard
    files and the frame settings), so repeated queries encode only the text."""
    from i2v.data.wds import build_eval_loader, expand_shards
    from i2v.eval import load_trained
    from i2v.text import tokenize
    from i2v.train.loop import autocast_for

    model, cfg = load_trained(checkpoint, list(overrides))
    if cfg.task != "retrieval":
        raise ValueError(f"--checkpoint: {checkpoint} is a {cfg.task} run; i2v search needs a retrieval checkpoint")
    ckpt = Path(checkpoint)
    urls = expand_shards(videos)
    cache = (ckpt if ckpt.is_dir() else ckpt.parent) / f"search-{_cache_key(ckpt, urls, cfg)}.pt"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    autocast = autocast_for(device, model.backbone.dtype)
    cached = cache.is_file()
    if cached:
        feats = torch.load(cache, weights_only=False)
    else:
        cfg.data.test_clips = cfg.data.test_crops = 1
        loader = build_eval_loader(cfg.data, shards=videos, captions=True)
        mean, std = model.backbone.mean, model.backbone.std
        vids, ids, metas = [], [], []
        with torch.no_grad():
            for video, batch_metas in loader:
                with autocast:
                    out = model.encode_video(normalize(video[:, 0].to(device), mean, std))
                vids.append({k: v.float().cpu() for k, v in out.items()})
                ids += [m["video_id"] for m in batch_metas]
                metas += [m["captions"][0] for m in batch_metas]
        if not ids:
            raise ValueError(f"--videos: {videos}: no readable clip ({loader.skipped.summary()})")
        feats = {"videos": {k: torch.cat([v[k] for v in vids]) for k in vids[0]}, "ids": ids, "captions": metas}
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(feats, tmp)
        tmp.replace(cache)
    with torch.no_grad(), autocast:
        texts = model.encode_text(tokenize(list(queries), cfg.retrieval.max_words).to(device))
    texts = {k: v.cpu() for k, v in texts.items()}
    sim = blocked_similarity(texts, feats["videos"], cfg.retrieval.interaction, cfg.retrieval.eval_block)
    k = min(topk, sim.shape[1])
    results = []
    for q, row in zip(queries, sim):
        score, idx = row.topk(k)
        top = [(feats["ids"][i], float(s), feats["captions"][i]) for s, i in zip(score.tolist(), idx.tolist())]
        results.append({"query": q, "top": top})
    return {"results": results, "cache": str(cache), "cached": cached, "videos": len(feats["ids"])}
