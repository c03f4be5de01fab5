"""The worker's optimisation step without Ray (single process, replicated backbone)."""

from __future__ import annotations

import torch
from conftest import tiny_cfg

from i2v.train.loop import Trainer


def test_gradient_accumulation_steps_once_with_the_big_batch_gradient():
    video, label = torch.randn(8, 4, 3, 32, 32), torch.randint(0, 5, (8,))
    seen = []  # gradients at the moment the optimizer steps
    for accum in (1, 2):
        cfg = tiny_cfg("m_adapter", "method.head_dropout=0.0", f"train.accum_steps={accum}", "train.grad_clip=0")
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
