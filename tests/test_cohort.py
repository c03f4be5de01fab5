"""Cohort training without Ray: member configs, the shared backbone forward, and members that end exactly where their
solo runs end (in one process here; on 2 Ray workers with ZeRO-3 and a killed worker in tests/test_train.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg

from i2v.cohort import member_configs, rungs, survivors
from i2v.config import ConfigError
from i2v.train.loop import Trainer, seed_all

MEMBERS = (
    "train.cohort=["
    "{},"  # the base config itself
    "{method.side_width: 48, train.lr: 3.0e-3, train.grad_clip: 0.5},"  # wider, faster, clipped
    "{method.head_dropout: 0.5, train.weight_decay: 0.2},"  # draws dropout masks from its own RNG stream
    "{method.name: m_adapter, method.width: 32, method.num_heads: 2},"  # another side network, other taps
    "{train.lr: 1.0e+30}]"  # diverges
)
STEPS, ACCUM = 4, 3  # windows of 3 and 1 micro-batches


def test_member_configs_are_the_solo_configs_and_bad_members_are_refused():
    cfg = tiny_cfg("side4video", MEMBERS, "train.accum_steps=2")
    members = member_configs(cfg)
    assert [m.method.name for m in members] == ["side4video"] * 3 + ["m_adapter", "side4video"]
    assert members[0] == tiny_cfg("side4video", "train.accum_steps=2")  # member 0 is the config without a cohort
    assert members[1].method.side_width == 48 and members[1].train.grad_clip == 0.5
    assert all(m.train.cohort == [] and m.train.accum_steps == 2 for m in members)
    assert member_configs(tiny_cfg("side4video")) == [tiny_cfg("side4video")]
    with pytest.raises(ConfigError, match=r"train.cohort\[1\]: data.frames: members may differ only in method.\*"):
        member_configs(tiny_cfg("side4video", "train.cohort=[{}, {data.frames: 8}]"))
    with pytest.raises(ConfigError, match=r"train.cohort\[0\]: train.epochs: members may differ only"):
        member_configs(tiny_cfg("side4video", "train.cohort=[{train.epochs: 3}]"))
    with pytest.raises(ConfigError, match=r"train.cohort\[1\]: method st_adapter back-propagates into the backbone"):
        member_configs(tiny_cfg("side4video", "train.cohort=[{}, {method.name: st_adapter}]"))
    with pytest.raises(ConfigError, match="train.cohort_halving: ranks members by val top-1, so it needs data.val"):
        member_configs(tiny_cfg("side4video", "train.cohort=[{}, {}]", "train.cohort_halving=2"))
    with pytest.raises(ConfigError, match="train: cohort_halving: 1 must be 0"):
        tiny_cfg("side4video", "train.cohort_halving=1")


def test_successive_halving_rungs_and_survivors():
    assert rungs(4, 2) == [1, 2] and rungs(9, 3) == [1, 3] and rungs(1, 2) == [] and rungs(8, 0) == []
    assert survivors({0: 0.5, 1: 0.9, 2: 0.7, 3: 0.9}, 2) == {1, 3}
    assert survivors({0: 0.5, 2: 0.7, 3: 0.9}, 2) == {2, 3}  # ceil(3 / 2)
    assert survivors({4: 0.1}, 2) == {4}


def test_the_backbone_runs_once_per_video_and_request_inside_shared_outputs():
    model = Trainer(tiny_cfg("side4video"), torch.device("cpu"), 0, 1, 1).model
    backbone, calls = model.backbone, []
    backbone.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    video, other = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        alone = backbone(video, [1, 3])
        with backbone.shared_outputs():
            first = backbone(video, [1, 3])
            again = backbone(video.flatten(0, 1).unflatten(0, (2, 4)), [-3, -1])  # a view, the same blocks
            assert len(calls) == 2 and again is first
            backbone(video, [0])  # another request: its own forward
            backbone(other, [1, 3])  # another video
            assert len(calls) == 4
            video.add_(1)  # changed in place: not the video the entry was made from
            backbone(video, [1, 3])
            assert len(calls) == 5
        backbone(other, [1, 3])
    assert len(calls) == 6 and backbone._shared is None
    assert all(torch.equal(a, b) for a, b in zip(alone[0], first[0], strict=True))
    with backbone.shared_outputs():  # with autograd on (in-block methods) nothing is shared
        backbone(other, [1, 3]), backbone(other, [1, 3])
    assert len(calls) == 8


def _train(cfg, batches, calls: list | None = None, rank: int = 0, world: int = 1) -> Trainer:
    """One epoch as train_fn_per_worker runs it: seeded, then STEPS micro-batches in windows of ACCUM; `calls` counts
    the backbone's forwards."""
    t = Trainer(cfg, torch.device("cpu"), rank, world, STEPS)
    if calls is not None:
        t.backbone.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    seed_all(123)
    t.seed_members()
    for i, (video, label) in enumerate(batches, start=1):
        t.train_step(
            video, label, boundary=i % ACCUM == 0 or i == STEPS, window=min(ACCUM, STEPS - (i - 1) // ACCUM * ACCUM)
        )
        t.step += 1
    return t


def test_each_member_ends_with_the_weights_of_its_solo_run_and_a_diverging_one_is_dropped():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)) for _ in range(STEPS)
    ]
    cfg = tiny_cfg("side4video", MEMBERS, f"train.accum_steps={ACCUM}")
    calls = []
    cohort = _train(cfg, batches, calls)
    # one forward per step for the Side4Video members' taps, one for the M-adapter's (other blocks)
    assert len(calls) == 2 * STEPS
    assert [m.status for m in cohort.members] == ["training"] * 4 + ["diverged"]
    assert cohort.members[4].stopped_at in (2, 3, 4)  # a global step; the first update (after step 3) blows it up
    for k, (member, solo_cfg) in enumerate(zip(cohort.members[:4], member_configs(cfg), strict=False)):
        solo = _train(solo_cfg, batches).model.trainable_state_dict()
        got = member.model.trainable_state_dict()
        assert got.keys() == solo.keys()
        for name in solo:
            torch.testing.assert_close(got[name], solo[name], rtol=0, atol=0, msg=f"member {k}: {name}")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(cohort.members[0].model.parameters(), cohort.members[2].model.parameters())
    )


# ----------------------------------------------------------------------------------------------------------------------
# 2 ranks over gloo, ZeRO-3 recipe A: the backbone partitioned in one optimizer-less engine, every member in its own
# DDP. The same equality, with DDP's gradient averaging and ZeRO-3's gathers in the loop.


def _worker(rank: int, port: int, members: str, out: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)  # every rank its own data
    batches = [
        (torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)) for _ in range(STEPS)
    ]
    cfg = tiny_cfg("side4video", members, f"train.accum_steps={ACCUM}", "backbone.partition=zero3")
    cohort = _train(cfg, batches, rank=rank, world=2)
    assert all(isinstance(m.forward, torch.nn.parallel.DistributedDataParallel) for m in cohort.members)
    solo = [_train(m, batches, rank=rank, world=2).model.trainable_state_dict() for m in member_configs(cfg)]
    out[rank] = {"cohort": [m.model.trainable_state_dict() for m in cohort.members], "solo": solo}
    dist.destroy_process_group()


def test_members_on_a_zero3_backbone_in_ddp_end_as_their_solo_runs():
    import torch.multiprocessing as mp
    from test_trainer_step import _free_port

    members = "train.cohort=[{}, {method.name: linear_probe, train.lr: 3.0e-3}]"  # widths: the 1-rank test above
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), members, out), nprocs=2, join=True)
    for rank in range(2):
        for k, (got, solo) in enumerate(zip(out[rank]["cohort"], out[rank]["solo"], strict=True)):
            assert got.keys() == solo.keys()
            for name in solo:
                torch.testing.assert_close(got[name], solo[name], rtol=0, atol=0, msg=f"rank {rank} member {k} {name}")
    # the ranks agree on every member's weights (BatchNorm statistics stay per rank until they are synchronised)
    for k, got in enumerate(out[1]["cohort"]):
        weights = [n for n in got if "running_" not in n and "num_batches" not in n]
        assert all(torch.equal(got[n], out[0]["cohort"][k][n]) for n in weights), k
