"""ZeRO-3 partitioning of the frozen backbone (i2v/train/deepspeed.py) on 2 CPU processes with gloo.

Each rank must hold about half of the backbone, load only its slice of the checkpoint, and produce the same logits
as the replicated (ordinary) model, for a side network (recipe A) and an in-backbone adapter (recipe B), in fp32 and
bf16. The tower must be held in `backbone.precision` whatever the CPU: DeepSpeed's own dtype choice depends on
whether the accelerator reports fp16 support, so the workers answer both ways.
"""

from __future__ import annotations

import os
import socket
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, ClipWrapper, tiny_cfg
from safetensors.torch import save_file

from i2v.backbone import load_backbone
from i2v.config import load_config
from i2v.methods import create_method, create_model

pytestmark = pytest.mark.timeout(300)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The "pretrained" tower is QuickGELU with its own input normalisation, as OpenAI's weights are: the partitioned
# tower must be built with what the config resolves to, exactly as the replicated reference is.
OPENAI_LIKE = ("backbone.quick_gelu=true", "backbone.mean=[0.5,0.4,0.3]", "backbone.std=[0.2,0.3,0.4]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held_dtypes(module: torch.nn.Module) -> set[str]:
    """The dtypes of the parameters and of the slices this rank holds of them."""
    return {str(t.dtype) for p in module.parameters() for t in (p, getattr(p, "ds_tensor", p))}


def _worker(rank: int, world: int, port: int, ckpt: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from deepspeed.accelerator import get_accelerator

    from i2v.train import deepspeed as ds
    from i2v.train.optim import build_optimizer

    ds.init_distributed("gloo")
    results = {"shm_left": sorted(str(ds.shm_buffer_path(r)) for r in range(world) if ds.shm_buffer_path(r).exists())}
    video = torch.load(os.path.join(os.path.dirname(ckpt), "video.pt"))
    for precision in ("fp32", "bf16"):
        for name in ("side4video", "st_adapter"):
            cfg = tiny_cfg(name, f"backbone.pretrained={ckpt}", "backbone.partition=zero3", *OPENAI_LIKE)
            cfg.backbone.precision, cfg.backbone.zero3_persistence_threshold = precision, 0
            backbone = ds.build_partitioned_backbone(cfg)
            torch.manual_seed(0)
            model = create_method(cfg.method, backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames)
            model.eval()
            r = {"held": ds.held_numel(backbone), "full": ds.full_numel(backbone)}
            r["built"] = (backbone.quick_gelu, backbone.mean, backbone.std)
            autocast = torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32")
            if model.backbone_no_grad:
                ds.side_engine(backbone, cfg)
                with torch.no_grad(), autocast:
                    r["logits"] = model(video)
            else:
                engine, optimizer, _ = ds.joint_engine(model, build_optimizer(model, cfg.train), None, cfg)
                engine.eval()
                with torch.no_grad(), autocast:
                    r["logits"] = engine(video)
                trainable = [p for p in model.parameters() if p.requires_grad]
                r["trainable"] = {str(t.dtype) for p in trainable for t in (p, p.ds_tensor)}
                r["master"] = {str(t.dtype) for t in optimizer.fp32_partitioned_groups_flat}
                r["grad_accum"] = str(engine.get_data_types()[1])
                r["communication"] = str(engine.communication_data_type)
                before = [t.clone() for t in optimizer.fp32_partitioned_groups_flat]
                engine.train()
                with autocast:
                    loss = engine(video).float().logsumexp(-1).mean()
                engine.backward(loss)
                engine.step()  # one optimizer step (through a bf16 tower too) updates the fp32 master weights
                after = optimizer.fp32_partitioned_groups_flat
                r["stepped"] = all(not torch.equal(a, b) for a, b in zip(before, after))
            r["tower"] = _held_dtypes(backbone)  # after the engine was built around it
            results[(precision, name)] = r

    # OpenAI's TorchScript archive layout: the activation is read from it (auto), each rank copies its own slices
    archive = tiny_cfg("side4video", f"backbone.pretrained={ckpt.replace('.safetensors', '.pt')}")
    reference = tiny_cfg("side4video", f"backbone.pretrained={ckpt}", "backbone.quick_gelu=true")
    for c in (archive, reference):
        c.backbone.partition, c.backbone.zero3_persistence_threshold = "zero3", 0
    a, b = ds.build_partitioned_backbone(archive), ds.build_partitioned_backbone(reference)
    results["archive"] = (
        a.quick_gelu,
        all(torch.equal(p.ds_tensor, q.ds_tensor) for p, q in zip(a.parameters(), b.parameters())),
    )

    # The tower DeepSpeed holds, as the CPU answers "fp16 supported?" either way (AMD EPYC: no; many Intel: yes).
    os.chdir(ROOT)  # the smoke config names its backbone relative to the repository
    accelerator = type(get_accelerator())
    for fp16_ok in (False, True):
        with mock.patch.object(accelerator, "is_fp16_supported", lambda self, ok=fp16_ok: ok):
            results[(fp16_ok, "smoke")] = _held_dtypes(ds.build_partitioned_backbone(load_config("configs/smoke.yaml")))
            for precision in ("fp32", "bf16", "fp16"):
                cfg = tiny_cfg("side4video", "backbone.partition=zero3", f"backbone.precision={precision}")
                results[(fp16_ok, precision)] = _held_dtypes(ds.build_partitioned_backbone(cfg))
    out[rank] = results
    dist.destroy_process_group()


def test_each_rank_holds_half_the_backbone_and_logits_match_the_replica(tmp_path):
    cfg = tiny_cfg("side4video", *OPENAI_LIKE)
    backbone = load_backbone(cfg.backbone)
    with torch.no_grad():  # a "pretrained" checkpoint distinct from any random init
        for p in backbone.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ckpt = tmp_path / "tower.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in backbone.visual.state_dict().items()}, ckpt)
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files are TorchScript all the same
        warnings.simplefilter("ignore", FutureWarning)
        archive = torch.jit.trace(ClipWrapper(backbone.visual).eval(), torch.randn(1, 3, 32, 32), check_trace=False)
        torch.jit.save(archive, str(tmp_path / "tower.pt"))
    video = torch.randn(2, 4, 3, 32, 32)
    torch.save(video, tmp_path / "video.pt")

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(ckpt), out), nprocs=2, join=True)

    for precision in ("fp32", "bf16"):
        for name in ("side4video", "st_adapter"):
            ref_cfg = tiny_cfg(name, f"backbone.pretrained={ckpt}", f"backbone.precision={precision}", *OPENAI_LIKE)
            torch.manual_seed(0)
            ref_backbone = load_backbone(ref_cfg.backbone)
            torch.manual_seed(0)
            reference = create_method(ref_cfg.method, ref_backbone, ref_cfg.data.num_classes, ref_cfg.data.frames)
            reference.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                expected = reference(video)
            full = sum(p.numel() for p in ref_backbone.parameters())
            norm = (ref_backbone.mean, ref_backbone.std)
            tol = {"rtol": 1e-4, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
            for rank in (0, 1):
                r = out[rank][(precision, name)]
                assert r["built"] == (True, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)) == (ref_backbone.quick_gelu, *norm)
                assert r["tower"] == {str(DTYPES[precision])}, (precision, name, rank, r["tower"])
                assert r["full"] == full
                assert abs(r["held"] / full - 0.5) < 0.01, (name, rank, r["held"], full)  # ~1/2 (last rank is padded)
                torch.testing.assert_close(r["logits"].float(), expected.float(), **tol)
                if name == "st_adapter":  # recipe B: trainable part, master weights, gradients all fp32
                    assert r["trainable"] == r["master"] == {"torch.float32"}, r
                    assert r["grad_accum"] == r["communication"] == "torch.float32", r
                    assert r["stepped"], (precision, rank)

    for rank in (0, 1):
        assert out[rank]["shm_left"] == [], out[rank]["shm_left"]  # DeepSpeed's ~66 MB /dev/shm segments, unlinked
        assert out[rank]["archive"] == (True, True), rank  # QuickGELU read from the archive, same slices
        for fp16_ok in (False, True):
            assert out[rank][(fp16_ok, "smoke")] == {"torch.float32"}, (rank, fp16_ok)  # configs/smoke.yaml: fp32
            for precision, dtype in DTYPES.items():
                assert out[rank][(fp16_ok, precision)] == {str(dtype)}, (rank, fp16_ok, precision)
    assert create_model(tiny_cfg("side4video")).backbone.dtype == torch.float32  # the eager path is untouched


def test_mixed_trainable_dtypes_are_refused_before_deepspeed_sees_them():
    from i2v.train import deepspeed as ds

    cfg = tiny_cfg("full_finetune", "backbone.precision=bf16", "backbone.partition=zero3")
    model = create_model(cfg)  # bf16 tower (trained) + fp32 head: ZeRO-3's one flat buffer cannot hold both
    with pytest.raises(ValueError, match=r"mix \['bfloat16', 'float32'\]; use backbone.precision=fp32"):
        ds.joint_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, cfg)
