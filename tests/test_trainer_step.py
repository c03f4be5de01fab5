"""The worker's optimisation step without Ray: one process (replicated backbone), and 2 processes over gloo for DDP,
ZeRO-3 recipe A (side network beside an optimizer-less engine) and recipe B (one joint DeepSpeed engine)."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_cfg

from i2v.train import checkpoint as ckpt
from i2v.train.loop import Trainer

WORLD, ACCUM, STEPS = 2, 3, 4  # an epoch of 4 micro-batches in windows of 3: the last window holds 1
B, T = 2, 4


def test_gradient_accumulation_steps_once_with_the_big_batch_gradient():
    video, label = torch.randn(8, 4, 3, 32, 32), torch.randint(0, 5, (8,))
    seen = []  # gradients at the moment the optimizer steps
    for accum in (1, 2):  # a method without batch statistics (BatchNorm sees a different batch in each half)
        cfg = tiny_cfg("st_adapter", "method.head_dropout=0.0", f"train.accum_steps={accum}", "train.grad_clip=0")
        t = Trainer(cfg, torch.device("cpu"), rank=0, world=1, steps_per_epoch=8)
        before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        steps = []

        def record(opt, *_, model=t.model, steps=steps):
            steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

        t.optimizer.register_step_pre_hook(record)
        if accum == 1:
            t.train_step(video, label, boundary=True)
        else:  # two half batches; the optimizer steps once, at the boundary
            t.train_step(video[:4], label[:4], boundary=False)
            assert steps == []
            t.train_step(video[4:], label[4:], boundary=True)
        assert len(steps) == 1 and all(p.grad is None for p in t.model.trainable_parameters())
        assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters() if n in before)
        seen.append(steps[0])
    for n in seen[0]:
        torch.testing.assert_close(seen[1][n], seen[0][n], rtol=1e-4, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------------------------------
# 2 ranks over gloo: every rank sees different data.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int, n: int, views: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches of this rank's data; ranks differ in content and in statistics (for BatchNorm)."""
    g = torch.Generator().manual_seed(100 + rank)
    shape = (B, T, 3, 32, 32) if views is None else (B, views, T, 3, 32, 32)
    return [
        (torch.randn(shape, generator=g) * (1 + 2 * rank) + rank, torch.randint(0, 5, (B,), generator=g))
        for _ in range(n)
    ]


def _val_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the validation set, 2 views per clip, as uint8 clips (evaluation normalises on the
    device)."""
    return [((v.clamp(-3, 3) * 40 + 128).to(torch.uint8), y) for v, y in _data(10 + rank, 2, views=2)]


def _windows() -> list[tuple[bool, int]]:
    """(boundary, window) of each micro-batch of the epoch, as train_fn_per_worker computes them."""
    return [(i % ACCUM == 0 or i == STEPS, min(ACCUM, STEPS - (i - 1) // ACCUM * ACCUM)) for i in range(1, STEPS + 1)]


def _trainable(t: Trainer) -> dict[str, torch.Tensor]:
    """Full values of the trainable parameters (gathered under ZeRO-3)."""
    from i2v.train import deepspeed as ds

    out = {}
    for n, p in t.model.named_parameters():
        if p.requires_grad:
            with ds.gathered([p]):
                out[n] = p.detach().clone()
    return out


def _run_epoch(t: Trainer, rank: int) -> list[dict]:
    """One epoch of STEPS micro-batches; per optimizer step: parameters the window saw and the gradient applied."""
    steps, pending = [], {}
    if t.engine is not None:
        from deepspeed.utils import safe_get_full_grad

        step = t.engine.step

        def engine_step(*a, **k):  # the reduced gradient, read at the boundary before the optimizer applies it
            if t.engine.is_gradient_accumulation_boundary():
                grads = {n: safe_get_full_grad(p).clone() for n, p in t.model.named_parameters() if p.requires_grad}
                steps.append(pending | {"grads": grads})
            return step(*a, **k)

        t.engine.step = engine_step
    else:

        def record(opt, *_):
            grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}
            steps.append(pending | {"grads": grads})

        t.optimizer.register_step_pre_hook(record)
    for i, ((video, label), (boundary, window)) in enumerate(zip(_data(rank, STEPS), _windows(), strict=True)):
        if i % ACCUM == 0:
            pending = {"params": _trainable(t)}
        t.train_step(video, label, boundary, window)
    return steps


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _worker(rank: int, port: int, tmp: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    cpu, res = torch.device("cpu"), {}
    common = (*_common(tmp), f"train.accum_steps={ACCUM}", "train.grad_clip=0")

    # DDP (replicated backbone), Side4Video (BatchNorm3d): accumulation, all-reduces per micro-batch, eval buffers.
    t = Trainer(tiny_cfg("side4video", *common), cpu, rank, WORLD, STEPS)
    reduces, counts = [], []  # gradient all-reduces so far (a comm hook counts its calls), after each micro-batch

    def counting_hook(state, bucket):
        reduces.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    t.forward.register_comm_hook(None, counting_hook)
    train_step = t.train_step
    t.train_step = lambda *a: (train_step(*a), counts.append(len(reduces)))[0]
    res["ddp_steps"] = _run_epoch(t, rank)
    res["ddp_reduces"] = counts
    res["ddp_eval"] = t.evaluate(_val_data(rank))
    res["ddp_buffers"] = {n: b.clone() for n, b in t.model.named_buffers() if not n.startswith("backbone.")}
    ckpt.save(t, Path(tmp), epoch=1)

    # Per-rank RNG: what a rank draws after a checkpoint is what it draws again after loading that checkpoint.
    random.seed(1234 + rank), np.random.seed(1234 + rank), torch.manual_seed(1234 + rank)
    (Path(tmp) / "rng_test").mkdir(exist_ok=True)
    ckpt.save(t, Path(tmp) / "rng_test", epoch=1)
    res["rng_expected"] = _draws()
    dist.barrier()  # state.pt (rank 0) and both ranks' RNG files are written
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.load(t, Path(tmp) / "rng_test")
    res["rng_restored"] = _draws()

    # ZeRO-3 recipe A: Side4Video beside an optimizer-less engine, its side network in DDP.
    t = Trainer(tiny_cfg("side4video", *common, "backbone.partition=zero3"), cpu, rank, WORLD, STEPS)
    _run_epoch(t, rank)
    res["zero3_eval"] = t.evaluate(_val_data(rank))
    res["zero3_buffers"] = {n: b.clone() for n, b in t.model.named_buffers() if not n.startswith("backbone.")}

    # ZeRO-3 recipe B: one joint DeepSpeed engine (ST-Adapter): accumulation over a short last window.
    t = Trainer(tiny_cfg("st_adapter", *common, "backbone.partition=zero3"), cpu, rank, WORLD, STEPS)
    res["joint_steps"] = _run_epoch(t, rank)
    out[rank] = res
    dist.destroy_process_group()


def _common(tmp) -> tuple[str, ...]:
    return "method.head_dropout=0.0", f"backbone.pretrained={Path(tmp) / 'tower.safetensors'}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks train one epoch on their own data, for each partition path, then evaluate and checkpoint."""
    from safetensors.torch import save_file

    from i2v.backbone import load_backbone

    tmp = tmp_path_factory.mktemp("two_ranks")
    backbone = load_backbone(tiny_cfg("side4video").backbone)  # one tower for all paths, loaded by path everywhere
    state = {f"visual.{k}": v.contiguous() for k, v in backbone.visual.state_dict().items()}
    save_file(state, tmp / "tower.safetensors")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp), out), nprocs=WORLD, join=True)
    return dict(out), tmp


def _expected_grads(method: str, steps: list[list[dict]], tmp) -> list[dict]:
    """Per window: the gradient of the mean loss over every micro-batch of the window on every rank, computed in one
    process from the parameters that window saw."""
    t = Trainer(tiny_cfg(method, *_common(tmp)), torch.device("cpu"), 0, 1, STEPS)
    data = [_data(rank, STEPS) for rank in range(WORLD)]
    starts = list(range(0, STEPS, ACCUM))
    expected = []
    for k, start in enumerate(starts):
        t.model.load_state_dict(steps[0][k]["params"], strict=False)
        t.model.zero_grad(set_to_none=True)
        batches = [data[r][i] for r in range(WORLD) for i in range(start, min(start + ACCUM, STEPS))]
        loss = sum(F.cross_entropy(t.model(v), y) for v, y in batches) / len(batches)
        loss.backward()
        expected.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad})
    return expected


@pytest.mark.parametrize("path, method", [("ddp", "side4video"), ("joint", "st_adapter")])
def test_each_update_has_the_gradient_of_the_mean_loss_of_its_actual_window(two_ranks, path, method):
    out, tmp = two_ranks
    steps = [out[rank][f"{path}_steps"] for rank in range(WORLD)]
    assert [len(s) for s in steps] == [2, 2]  # windows of 3 and 1 micro-batches
    for rank in range(WORLD):  # every rank started each window from the same parameters and applied the same gradient
        for k in range(2):
            for n, g in steps[0][k]["grads"].items():
                torch.testing.assert_close(steps[rank][k]["params"][n], steps[0][k]["params"][n], msg=n)
                torch.testing.assert_close(steps[rank][k]["grads"][n], g, msg=n)
    for k, expected in enumerate(_expected_grads(method, steps, tmp)):
        for n, g in expected.items():
            torch.testing.assert_close(steps[0][k]["grads"][n], g, rtol=1e-4, atol=1e-6, msg=f"window {k}: {n}")


def test_ddp_all_reduces_only_at_the_last_micro_batch_of_a_window(two_ranks):
    out, _ = two_ranks
    for rank in range(WORLD):
        counts = out[rank]["ddp_reduces"]  # cumulative, after micro-batches 1..4 (boundaries after 3 and 4)
        assert counts[0] == counts[1] == 0, counts
        assert 0 < counts[2] < counts[3] == 2 * counts[2], counts


@pytest.mark.parametrize("path", ["ddp", "zero3"])
def test_every_rank_evaluates_the_buffers_that_are_checkpointed(two_ranks, path):
    out, tmp = two_ranks
    buffers = [out[rank][f"{path}_buffers"] for rank in range(WORLD)]
    assert buffers[0] and buffers[0].keys() == buffers[1].keys()
    for n in buffers[0]:
        assert torch.equal(buffers[0][n], buffers[1][n]), n  # the ranks trained on different data
    assert out[0][f"{path}_eval"] == out[1][f"{path}_eval"]
    if path == "ddp":  # the checkpointed model, evaluated alone on every rank's share, gives the same metrics
        state = torch.load(tmp / ckpt.STATE, weights_only=False)["model"]
        assert all(torch.equal(state[n], b) for n, b in buffers[0].items())
        alone = Trainer(tiny_cfg("side4video", *_common(tmp)), torch.device("cpu"), 0, 1, STEPS)
        alone.model.load_trainable_state_dict(state)
        assert alone.evaluate([b for r in range(WORLD) for b in _val_data(r)]) == out[0]["ddp_eval"]


def test_each_rank_restores_its_own_rng_state(two_ranks):
    out, tmp = two_ranks
    assert out[0]["rng_expected"] != out[1]["rng_expected"]
    for rank in range(WORLD):
        assert out[rank]["rng_restored"] == out[rank]["rng_expected"]
    assert sorted(p.name for p in (tmp / "rng_test" / "rng").iterdir()) == ["rank_000.pt", "rank_001.pt"]


@pytest.mark.parametrize("method", ["side4video", "m_adapter"])
def test_sync_bn_converts_the_side_networks_batchnorm_with_the_same_checkpoint_keys(method):
    plain = Trainer(tiny_cfg(method), torch.device("cpu"), 0, 1, STEPS)
    synced = Trainer(tiny_cfg(method, "method.sync_bn=true"), torch.device("cpu"), 0, 1, STEPS)
    bn = [m for m in plain.model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    sync = [m for m in synced.model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert bn and len(sync) == len(bn) and not any(type(m) is torch.nn.BatchNorm3d for m in synced.model.modules())
    a, b = plain.model.trainable_state_dict(), synced.model.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a SyncBatchNorm checkpoint loads as BN
    video = torch.randn(2, 4, 3, 32, 32)
    plain.model.eval(), synced.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(synced.model(video), plain.model(video))


def test_sync_bn_is_a_config_error_on_cpu_workers_and_on_methods_without_batchnorm(tmp_path):
    from i2v.config import ConfigError
    from i2v.train.driver import validate

    with pytest.raises(ConfigError, match=r"method.sync_bn: true needs GPU workers \(train.use_gpu: true\)"):
        validate(tiny_cfg("side4video", "method.sync_bn=true", f"data.train_shards={tmp_path}/x.tar"))
    with pytest.raises(ConfigError, match="method.sync_bn: unknown key"):
        tiny_cfg("st_adapter", "method.sync_bn=true")
