"""Text-video retrieval (i2v/tasks/retrieval.py, i2v/text.py): parameter counts of the reference, the text tower,
the WTI similarity in blocks, the metrics' multi-caption conventions, the all-gathered loss on 2 processes, and the
caption shards' loader."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT
from safetensors.torch import save_file

from i2v.backbone import load_backbone
from i2v.config import load_config
from i2v.tasks import get_task
from i2v.tasks.retrieval import blocked_similarity, contrastive_loss, retrieval_metrics, similarity
from i2v.text import load_text_tower, tokenize
from i2v.train.optim import param_groups

TINY_CLIP = str(ROOT / "configs/backbones/i2v-tiny-clip.json")  # the tiny ViT + a 2-block text tower (CLIP BPE)
TINY = {"side4video": ["method.side_width=32", "method.side_head_dim=16"], "linear_probe": [], "full_finetune": []}


def retrieval_cfg(method: str = "side4video", *overrides: str):
    return load_config(
        None,
        list(overrides),
        defaults=[
            "task=retrieval",
            f"backbone.name={TINY_CLIP}",
            "data.frames=4",
            f"method.name={method}",
            *TINY[method],
        ],
    )


def build(cfg):
    return get_task(cfg).build_model(cfg, load_backbone(cfg.backbone))


def test_vit_b16_trainable_parameters_match_the_reference():
    """shared/RETRIEVAL_FEWSHOT.md §1.8: 21,829,250 at the base lr, 63,822,849 at lr x coef_lr (ViT-B/16, T=12,
    side width 320, the Retrieval code's 197-row side position table)."""
    cfg = load_config(
        None,
        ["task=retrieval", "backbone.name=ViT-B-16", "data.frames=12", "method.name=side4video", "method.cls_pos=true"],
    )
    model = get_task(cfg).build_model(cfg, load_backbone(cfg.backbone, device="meta"))
    counts = {}
    for g in param_groups(model, cfg.train):
        counts[g["lr"] / cfg.train.lr] = counts.get(g["lr"] / cfg.train.lr, 0) + sum(p.numel() for p in g["params"])
    assert counts == {1.0: 21_829_250, cfg.retrieval.coef_lr: 63_822_849}
    side = sum(p.numel() for n, p in model.named_parameters() if n.startswith("method.") and "frame_proj" not in n)
    assert side == 21_302_912


def test_clip_train_modes():
    """retrieval.clip_train: the text tower, ln_post / proj copies and logit_scale train at lr x coef_lr (low_lr),
    at lr (full), or not at all (frozen); the side network always trains at lr."""
    for mode, factor in (("frozen", None), ("full", 1.0), ("low_lr", 1e-3)):
        cfg = retrieval_cfg("side4video", f"retrieval.clip_train={mode}")
        model = build(cfg)
        clip = {
            id(p)
            for n, p in model.named_parameters()
            if n.startswith(("text.", "method.frame_proj")) or n == "logit_scale"
        }
        assert len(clip) == len(list(model.text.parameters())) + 4  # ln_post weight, bias, proj, logit_scale
        groups = param_groups(model, cfg.train)
        got = {round(g["lr"] / cfg.train.lr, 6) for g in groups for p in g["params"] if id(p) in clip}
        assert got == (set() if factor is None else {factor})
        side = {round(g["lr"] / cfg.train.lr, 6) for g in groups for p in g["params"] if id(p) not in clip}
        assert side == {1.0}


def test_tokenize_follows_the_reference():
    ids = tokenize(["A  Red square,  moving LEFT", " ".join(["word"] * 50)], 32)
    sot, eot = 49406, 49407
    assert ids.shape == (2, 32) and ids.dtype == torch.int64
    assert ids[0, 0] == sot and (ids[0] == eot).sum() == 1 and ids[0].argmax() == (ids[0] != 0).sum() - 1
    assert (ids[0] == tokenize(["a red square, moving left"], 32)[0]).all()  # cleaned and lower-cased
    assert ids[1, 0] == sot and ids[1, -1] == eot and (ids[1] != 0).all()  # SOT + 30 tokens + EOT


def test_side4video_starts_from_clip_frame_embeddings_and_trains():
    """side_proj is zero-initialised: the side network's retrieval output starts as the frozen ViT's frame
    embeddings (linear_probe's), and one backward reaches side_proj, the WTI MLPs, the text tower and logit_scale."""
    video = torch.randn(2, 4, 3, 32, 32)
    text = tokenize(["a red square moving left", "a blue circle moving right"], 32)
    frames = {}
    for method in ("side4video", "linear_probe"):
        cfg = retrieval_cfg(method)
        torch.manual_seed(0)
        model = build(cfg)
        out = model(video, text)
        assert out["frames"].shape == (2, 4, 32) and out["tokens"].shape == (2, 32, 32)
        frames[method] = out["frames"]
        loss, _ = get_task(cfg).loss(out)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing
        assert all(p.grad is None for p in model.backbone.parameters())
        if method == "side4video":
            assert model.method.side_proj.grad.abs().sum() > 0
        assert model.logit_scale.grad is not None and model.text.tower.text_projection.grad.abs().sum() > 0
    torch.testing.assert_close(frames["side4video"], frames["linear_probe"])


def test_full_finetune_trains_both_towers_as_clip4clip():
    """method.name=full_finetune under task: retrieval is CLIP4Clip: the backward reaches the vision tower's blocks
    (every trainable parameter gets a gradient, as DDP requires: the tower's own ln_post / proj, which the frame
    projection copies, do not train), and under low_lr the vision tower trains at lr x coef_lr like the text tower."""
    cfg = retrieval_cfg("full_finetune", "retrieval.interaction=mean")
    model = build(cfg).train()
    out = model(torch.randn(2, 4, 3, 32, 32), tokenize(["a red square moving left", "a blue circle"], 32))
    loss, _ = get_task(cfg).loss(out)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None]
    blocks = [n for n in trainable if n.startswith("backbone.") and ".resblocks." in n]
    assert blocks and all(trainable[n].grad.abs().sum() > 0 for n in blocks)
    assert not model.backbone.visual.proj.requires_grad and not model.backbone.visual.ln_post.weight.requires_grad
    factors = {id(p): g["lr"] / cfg.train.lr for g in param_groups(model, cfg.train) for p in g["params"]}
    assert {factors[id(trainable[n])] for n in blocks} == {cfg.retrieval.coef_lr}


def test_text_tower_loads_a_full_clip_checkpoint(tmp_path):
    """The text tower and logit_scale come from the same file as the vision tower; its EOT row is open_clip's
    encode_text."""
    open_clip.add_model_config(TINY_CLIP)
    clip = open_clip.create_model("i2v-tiny-clip").eval()
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    cfg = retrieval_cfg("linear_probe", f"backbone.pretrained={path}", "backbone.quick_gelu=false")
    text, scale = load_text_tower(cfg.backbone, 32)
    ids = tokenize(["a red square moving left", "a circle"], 32)
    with torch.no_grad():
        _, eot = text(ids)
        torch.testing.assert_close(eot, clip.encode_text(ids))
    assert scale.item() == pytest.approx(3.0)
    model = build(cfg)
    torch.testing.assert_close(model.method.frame_proj.proj, clip.visual.proj)


def test_blocked_similarity_equals_unblocked():
    torch.manual_seed(1)
    n, m, L, T, E = 13, 9, 7, 5, 8
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (n, 1))
    texts = {"tokens": torch.randn(n, L, E), "token_w": torch.randn(n, L), "mask": mask, "eot": torch.randn(n, E)}
    videos = {"frames": torch.randn(m, T, E), "frame_w": torch.randn(m, T)}
    for interaction in ("wti", "mean"):
        full = similarity(texts, videos, interaction)
        torch.testing.assert_close(blocked_similarity(texts, videos, interaction, block=4), full)
    # WTI by hand for one pair: padded tokens count 0 in the max over tokens, every frame counts
    i, j = 3, 2
    t = torch.nn.functional.normalize(texts["tokens"][i], dim=-1)
    v = torch.nn.functional.normalize(videos["frames"][j], dim=-1)
    s = (t @ v.T) * mask[i][:, None]
    wt = texts["token_w"][i].masked_fill(~mask[i], -1e9).softmax(0)
    wv = videos["frame_w"][j].softmax(0)
    expect = ((s.max(1).values * wt).sum() + (s.max(0).values * wv).sum()) / 2
    torch.testing.assert_close(similarity(texts, videos, "wti")[i, j], expect)


def _reference_metrics(sim: np.ndarray, video_of: np.ndarray) -> dict:
    """Side4Video's (CLIP4Clip's) metrics.py path for multi-sentence sets: cut_off_points -> (videos, max_captions,
    videos) padded with -inf, tensor_text_to_video_metrics, tensor_video_to_text_sim + compute_metrics."""
    M = sim.shape[1]
    groups = [np.where(video_of == v)[0] for v in range(M)]
    K = max(len(g) for g in groups)
    tensor = np.full((M, K, M), -np.inf)
    for v, g in enumerate(groups):
        tensor[v, : len(g)] = sim[g]
    t = torch.from_numpy(tensor)
    stacked = t.permute(1, 0, 2)
    second = torch.argsort(torch.argsort(stacked, dim=-1, descending=True), dim=-1)
    ranks = torch.flatten(torch.diagonal(second, dim1=1, dim2=2))
    orig = torch.flatten(torch.diagonal(t, dim1=0, dim2=2))
    t2v = ranks[~torch.isinf(orig)].numpy()
    v2t_sim = torch.max(t.masked_fill(torch.isinf(t), float("-inf")), dim=1).values.T.numpy()  # (query video, group)
    sx = np.sort(-v2t_sim, axis=1)
    d = np.diag(-v2t_sim)
    v2t = np.where((sx - d[:, None]) == 0)[1]

    def summary(r):
        return [100 * np.mean(r < 1), 100 * np.mean(r < 5), 100 * np.mean(r < 10), np.median(r) + 1, np.mean(r) + 1]

    return dict(zip(("t2v", "v2t"), (summary(t2v), summary(v2t))))


def test_metrics_follow_the_reference_multi_caption_conventions():
    rng = np.random.default_rng(0)
    M = 30
    counts = rng.integers(1, 5, M)
    video_of = np.repeat(np.arange(M), counts)
    sim = rng.normal(size=(len(video_of), M))
    sim[np.arange(len(video_of)), video_of] += rng.uniform(0, 3, len(video_of))  # better than chance
    ours = retrieval_metrics(torch.from_numpy(sim).float(), torch.from_numpy(video_of))
    ref = _reference_metrics(sim.astype(np.float32).astype(np.float64), video_of)
    for d in ("t2v", "v2t"):
        got = [ours[f"{d}_{k}"] for k in ("r1", "r5", "r10", "mdr", "mnr")]
        np.testing.assert_allclose(got, ref[d], rtol=1e-6)
    assert ours["num_videos"] == M and ours["num_captions"] == len(video_of) and ours["chance_r1"] == 100 / M
    assert ours["t2v_r1"] > 3 * ours["chance_r1"]


def test_tied_scores_count_as_random_tie_breaking_not_as_hits():
    """A model that scores every video alike is at chance (the reference's first-match rule would give R@1 = 100),
    and a caption tied with one other video (an order-invariant model on a time-reversed pair) gets half a hit."""
    flat = retrieval_metrics(torch.zeros(6, 6), torch.arange(6))
    assert flat["t2v_r1"] == pytest.approx(100 / 6) and flat["t2v_r5"] == pytest.approx(500 / 6)
    assert flat["t2v_r10"] == 100 and flat["t2v_mnr"] == pytest.approx(3.5) and flat["v2t_r1"] == pytest.approx(100 / 6)
    sim = torch.eye(4) + torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0.5, 0]])  # pair 0-1 tied
    m = retrieval_metrics(sim, torch.arange(4))
    assert m["t2v_r1"] == pytest.approx(75.0) and m["t2v_mnr"] == pytest.approx(1.25) and m["t2v_mdr"] == 1.25


# ----------------------------------------------------------------------------------------------------------------------
# The all-gathered loss: 2 gloo processes == 1 process on the global batch


class _Toy(torch.nn.Module):
    """Linear encoders + WTI weight layers: per-rank features of the same kind as the retrieval model's."""

    def __init__(self):
        super().__init__()
        self.v, self.t = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)
        self.vw, self.tw = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, video, text, mask):
        frames, tokens = self.v(video), self.t(text)
        return {
            "frames": frames,
            "frame_w": self.vw(frames).squeeze(-1),
            "tokens": tokens,
            "token_w": self.tw(tokens).squeeze(-1),
            "eot": tokens[:, 0],
            "mask": mask,
            "scale": self.logit_scale.exp().squeeze(),
        }


def _global_batch():
    g = torch.Generator().manual_seed(5)
    video, text = torch.randn(8, 3, 6, generator=g), torch.randn(8, 5, 6, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 3, 5, 1, 4, 5, 2])[:, None]
    return video, text, mask


def _loss_and_grads(model, video, text, mask, interaction):
    model.zero_grad()
    loss, _ = contrastive_loss(model(video, text, mask), interaction)
    loss.backward()
    # (the weight layers get no gradient under "mean")
    return loss.detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


def _gather_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    video, text, mask = _global_batch()
    n = len(video) // world
    own = slice(rank * n, (rank + 1) * n)
    for interaction in ("wti", "mean"):
        torch.manual_seed(0)
        model = _Toy()
        loss, grads = _loss_and_grads(model, video[own], text[own], mask[own], interaction)
        for g in grads.values():  # what DDP does with the gradients
            dist.all_reduce(g)
            g /= world
        out[(rank, interaction)] = (loss, grads)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_gather_loss_and_gradients_equal_one_process_on_the_global_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2, join=True)
    video, text, mask = _global_batch()
    for interaction in ("wti", "mean"):
        torch.manual_seed(0)
        loss, grads = _loss_and_grads(_Toy(), video, text, mask, interaction)
        for rank in range(2):
            got_loss, got = out[(rank, interaction)]
            torch.testing.assert_close(got_loss, loss)
            for name, g in grads.items():
                torch.testing.assert_close(got[name], g, msg=f"{interaction} {name} rank {rank}")


# ----------------------------------------------------------------------------------------------------------------------
# Caption shards


def write_caption_shards(root, videos: list[tuple[str, list[str], bytes]], per_shard: int = 3) -> str:
    """Retrieval shards as the packers write them: KEY.mp4 + KEY.json {"video_id", "captions"}, index.json with
    "task": "retrieval"; returns the directory."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for s in range(0, len(videos), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for i, (vid, caps, data) in enumerate(videos[s : s + per_shard]):
                meta = json.dumps({"video_id": vid, "captions": caps}).encode() if caps is not None else b"{oops"
                for ext, payload in (("mp4", data), ("json", meta)):
                    info = tarfile.TarInfo(f"{s + i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards[name] = len(videos[s : s + per_shard])
    (root / "index.json").write_text(json.dumps({"task": "retrieval", "shards": shards}))
    return str(root)


def synth_videos(n: int, seed: int = 0):
    from i2v.data.synth import CLASSES, render_clip
    from i2v.data.video import encode_video

    out = []
    for i in range(n):
        clip = render_clip(CLASSES[i % 2], np.random.default_rng([seed, i]), frames=8, height=32, width=32)
        out.append(encode_video(clip, 8.0))
    return out


def test_caption_loader_expands_pairs_and_skips_malformed_samples(tmp_path):
    from i2v.data.wds import build_eval_loader, build_train_loader, count_captions, steps_per_epoch

    media = synth_videos(5)
    captions = [["a left", "b left"], ["c right"], ["d left", "e", "f"], None, ["g right"]]  # sample 3 is malformed
    shards = write_caption_shards(
        tmp_path / "train", [(f"v{i}", c, m) for i, (c, m) in enumerate(zip(captions, media))]
    )
    cfg = load_config(
        None, [f"data.train_shards={shards}", f"data.val_shards={shards}", "data.size=32", "data.frames=4"]
    ).data
    cfg.batch_size, cfg.num_workers, cfg.eval_batch_size = 1, 0, 2
    assert count_captions(shards) == 7  # scanned: this index.json has no "captions"
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    (tmp_path / "train" / "index.json").write_text(json.dumps(index | {"captions": 99}))
    assert count_captions(f"{shards}/shard-*.tar") == 99  # the pack's total, when every shard is named
    assert count_captions(f"{shards}/shard-000000.tar") == 6  # one shard (2 + 1 + 3 captions): scanned
    (tmp_path / "train" / "index.json").write_text(json.dumps(index))
    assert steps_per_epoch(cfg, 1, pairs=True) == 7
    loader = build_train_loader(cfg, captions=True, resampled=False)
    pairs = [(m["video_id"], m["caption"]) for video, metas in loader for m in metas]
    assert sorted(pairs) == sorted((f"v{i}", c) for i, cs in enumerate(captions) if cs for c in cs)
    assert loader.skipped.count == 1 and "json" in loader.skipped.samples[0][1]
    val = build_eval_loader(cfg, captions=True)
    metas = [m for video, ms in val for m in ms]
    assert video_shape_ok(val)
    assert [m["captions"] for m in metas] == [c for c in captions if c]
    assert val.skipped.count == 1


def video_shape_ok(loader) -> bool:
    video, metas = next(iter(loader))
    return tuple(video.shape[1:]) == (1, 4, 3, 32, 32) and video.dtype == torch.uint8 and len(metas) == len(video)


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def captioned_clip(colour: str, shape: str, direction: str, rng: np.random.Generator, t: int = 8, size: int = 32):
    """(T, H, W, 3) uint8: a coloured shape moving left or right over a grey noisy background."""
    from PIL import Image, ImageDraw

    r = size // 5
    y = rng.uniform(r, size - r)
    xs = np.linspace(r + 1, size - r - 1, t) + rng.uniform(-2, 2)
    xs = xs if direction == "right" else xs[::-1]
    out = np.empty((t, size, size, 3), np.uint8)
    for i, x in enumerate(xs):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        box = (x - r, y - r, x + r, y + r)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        out[i] = np.clip(np.asarray(img, np.float64) + rng.normal(0, 8, (size, size, 3)), 0, 255)
    return out


def make_captioned_shards(root, n: int, seed: int, per_shard: int = 8) -> str:
    """Retrieval shards of `n` clips whose captions need appearance and motion: "a red square moving left" vs
    "... moving right" vs "a blue circle moving left"; two phrasings per clip."""
    from i2v.data.video import encode_video

    rng = np.random.default_rng(seed)
    videos = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        direction = ("left", "right")[(i // 8) % 2]
        clip = captioned_clip(colour, shape, direction, rng)
        caps = [f"a {colour} {shape} moving {direction}", f"the {shape} is {colour} and goes to the {direction}"]
        videos.append((f"clip{seed}_{i:04d}", caps, encode_video(clip, 8.0)))
    return write_caption_shards(root, videos, per_shard)


def test_eval_rebuilds_random_init_towers_as_training_built_them(tmp_path):
    """Without backbone.pretrained the frozen towers are random: `i2v eval` / `search` must rebuild the very towers
    the run trained on (seeded as the trainer seeds), or a checkpoint is scored on other features."""
    from i2v.eval import load_trained
    from i2v.train.loop import seed_all

    cfg = retrieval_cfg("side4video")
    seed_all(cfg.train.seed)  # as Trainer.__init__
    model = build(cfg)
    torch.save({"model": model.trainable_state_dict(), "cfg": cfg.to_dict()}, tmp_path / "state.pt")
    torch.manual_seed(123)
    loaded, _ = load_trained(tmp_path / "state.pt")
    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
