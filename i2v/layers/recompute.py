"""A linear layer that keeps less for backward: `y = linear(fn(x))` keeping `x`, not `fn(x)`.

Autograd keeps a linear layer's input for its weight gradient. When that input is a cheap function of a tensor that
has to be kept anyway or is smaller (a norm of the residual stream, a GELU of the hidden layer, a depthwise conv),
keeping `x` and recomputing `fn(x)` in backward saves the bytes of `fn(x)` for the price of one more `fn` forward.
Unlike `torch.utils.checkpoint` around `fn` and the linear layer together, the linear layer's own matmul is not
recomputed: its gradients are taken from the recomputed input directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


class _RecomputedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, z, weight, bias, *params):
        device = x.device.type  # meta tensors (FLOP counting, the planner) have no autocast
        on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        ctx.fn, ctx.autocast = fn, torch.get_autocast_dtype(device) if on else None
        ctx.save_for_backward(x, weight, bias, *params)
        return F.linear(z, weight.flatten(1), bias)  # under the caller's autocast, like a plain F.linear

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # The recomputed graph lives only inside this backward node: identity hooks keep it out of any saved-tensor
        # accounting around the step (as torch.utils.checkpoint's own recomputation is); its bytes are transient.
        with (
            torch.enable_grad(),
            torch.autocast(x.device.type, dtype=ctx.autocast) if ctx.autocast else contextlib.nullcontext(),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            xr = x.detach().requires_grad_(needs[1])
            z = ctx.fn(xr, *params)
        zc = z.detach().to(dy.dtype)  # what F.linear multiplied (autocast casts its input and weight)
        dy2, z2 = dy.flatten(0, -2), zc.flatten(0, -2)
        dweight = None
        if needs[3]:
            dweight = (dy2.T @ z2).to(weight.dtype).view(weight.shape)
            if dweight.stride() != weight.stride():  # e.g. a channels-last conv weight: DDP wants the weight's layout
                dweight = torch.empty_like(weight).copy_(dweight)
        dbias = dy2.sum(0).to(bias.dtype) if bias is not None and needs[4] else None
        wanted = [t for t, need in zip((xr, *params), (needs[1], *needs[5:])) if need]
        dz = (dy @ weight.flatten(1).to(dy.dtype)).to(z.dtype)
        grads = iter(torch.autograd.grad(z, wanted, dz) if wanted else [])
        dx = next(grads) if needs[1] else None
        return None, dx, None, dweight, dbias, *(next(grads) if need else None for need in needs[5:])


def recomputed_linear(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *params: torch.Tensor,
) -> torch.Tensor:
    """`F.linear(z, weight, bias)` where `z == fn(x, *params)`, keeping `x` (not `z`) for backward.

    Gradients are those of `F.linear(fn(x, *params), weight, bias)`; backward recomputes `fn` once, under the autocast
    state of the forward.

    Args:
        fn: a pure function of `x` and `params` (no state updates: the caller computes `z` with its modules, e.g. a
            BatchNorm that updates running statistics, and `fn` repeats the same arithmetic, e.g. with batch
            statistics and no running buffers).
        x: what is kept; it may not require grad (a frozen backbone's tokens).
        z: `fn(x, *params)` computed by the caller, under `torch.no_grad()`; not kept.
        weight: (out, in), or a 1x1x1 convolution's (out, in, 1, 1, 1) applied to channels-last tokens.
        bias: (out,) or None.
        params: the tensors `fn` uses that get gradients.
    """
    return _RecomputedInputLinear.apply(fn, x, z, weight, bias, *params)
