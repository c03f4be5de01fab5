"""ZeRO-3 partitioning of the frozen backbone (i2v/train/deepspeed.py) on 2 CPU processes with gloo.

Each rank must hold about half of the backbone, load only its slice of the checkpoint, and produce the same logits
as the replicated (ordinary) model, for a side network (recipe A) and an in-backbone adapter (recipe B).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_cfg
from safetensors.torch import save_file

from i2v.backbone import load_backbone
from i2v.methods import create_method, create_model

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, ckpt: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from i2v.train import deepspeed as ds
    from i2v.train.optim import build_optimizer

    ds.init_distributed("gloo")
    video = torch.load(os.path.join(os.path.dirname(ckpt), "video.pt"))
    results = {}
    for name in ("side4video", "st_adapter"):
        cfg = tiny_cfg(name, f"backbone.pretrained={ckpt}", "backbone.partition=zero3")
        cfg.backbone.zero3_persistence_threshold = 0
        backbone = ds.build_partitioned_backbone(cfg)
        torch.manual_seed(0)
        model = create_method(cfg.method, backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames)
        model.eval()
        held, full = ds.held_numel(backbone), ds.full_numel(backbone)
        if model.backbone_no_grad:
            ds.side_engine(backbone, cfg)
            with torch.no_grad():
                logits = model(video)
        else:
            engine, *_ = ds.joint_engine(model, build_optimizer(model, cfg.train), None, cfg)
            engine.eval()
            with torch.no_grad():
                logits = engine(video)
        results[name] = {"held": held, "full": full, "logits": logits}
    out[rank] = results
    dist.destroy_process_group()


def test_each_rank_holds_half_the_backbone_and_logits_match_the_replica(tmp_path):
    cfg = tiny_cfg("side4video")
    backbone = load_backbone(cfg.backbone)
    with torch.no_grad():  # a "pretrained" checkpoint distinct from any random init
        for p in backbone.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ckpt = tmp_path / "tower.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in backbone.visual.state_dict().items()}, ckpt)
    video = torch.randn(2, 4, 3, 32, 32)
    torch.save(video, tmp_path / "video.pt")

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(ckpt), out), nprocs=2, join=True)

    for name in ("side4video", "st_adapter"):
        ref_cfg = tiny_cfg(name, f"backbone.pretrained={ckpt}")
        torch.manual_seed(0)
        ref_backbone = load_backbone(ref_cfg.backbone)
        torch.manual_seed(0)
        reference = create_method(ref_cfg.method, ref_backbone, ref_cfg.data.num_classes, ref_cfg.data.frames).eval()
        with torch.no_grad():
            expected = reference(video)
        full = sum(p.numel() for p in ref_backbone.parameters())
        for rank in (0, 1):
            r = out[rank][name]
            assert r["full"] == full
            assert abs(r["held"] / full - 0.5) < 0.01, (name, rank, r["held"], full)  # ~1/2 (last rank is padded)
            torch.testing.assert_close(r["logits"], expected, rtol=1e-4, atol=1e-5)
    assert create_model(tiny_cfg("side4video"))  # the eager path is untouched by the workers
