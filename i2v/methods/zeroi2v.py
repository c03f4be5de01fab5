"""ZeroI2V (Li, Zhu, Wang; ECCV 2024, arXiv 2310.01324): spatial-temporal dual-headed attention (STDHA) and linear
adapters that are folded into the frozen weights after training, so inference costs what the image model costs.

    video -> tokens (B*T, 1+L, D) + temporal embedding (before ln_pre) -> blocks, each:
        x = x + S_Ad(STDHA(T_Ad(LN1(x))));   x = x + Out_Ad(MLP(In_Ad(LN2(x))))
    -> ln_post (trainable) of the class token per frame -> mean over T -> Dropout -> Linear -> (B, K)

STDHA is the block's own multi-head attention with keys and values of some heads taken from other frames (head h of
frame t reads frame t + stdha_offsets[h]); it adds no parameters. The backbone blocks stay plain open_clip blocks: the
adapters live in `self.adapters`, so `merge()` just folds them into the blocks' linear layers and drops them, leaving
`backbone.visual` an ordinary open_clip tower (loadable with open_clip keys) plus the parameter-free STDHA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from i2v.layers import LinearAdapter, linear_head, temporal_shift
from i2v.methods import register_method
from i2v.methods.base import VideoMethod

ADAPTER_SLOTS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


class STDHA(nn.Module):
    """Multi-head self-attention with per-head temporally shifted keys/values, computed with the weights of the
    block's own `nn.MultiheadAttention` (passed in): head h of frame t reads frame t + offsets[h].

    Parameter-free. It is a module (not a function) so that ZeRO-3 can gather the in-projection it reads for
    exactly the duration of its call (`ZeroI2V.zero3_external_parameters`).
    """

    def __init__(self, offsets: list[int]):
        super().__init__()
        self.offsets = list(offsets)

    def forward(self, attn: nn.MultiheadAttention, x: torch.Tensor, T: int) -> torch.Tensor:
        """x: (B*T, N, D) -> (B*T, N, D). The shift follows the in-projection, so it commutes with folding an adapter
        into that projection."""
        BT, N, D = x.shape
        H = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # 3 x (B*T, N, D)
        k, v = temporal_shift(k, T, self.offsets, D // H), temporal_shift(v, T, self.offsets, D // H)
        q, k, v = (t.unflatten(-1, (H, D // H)).transpose(1, 2) for t in (q, k, v))  # (B*T, H, N, D/H)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B*T, N, D)
        return attn.out_proj(out)


@register_method("zeroi2v")
class ZeroI2V(VideoMethod):
    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        backbone.require_native("zeroi2v")
        depth, width, heads = len(backbone.blocks), backbone.width, backbone.num_heads
        if len(cfg.stdha_offsets) > heads:
            raise ValueError(f"method.stdha_offsets: {len(cfg.stdha_offsets)} offsets for a {heads}-head backbone")
        if any(abs(d) >= num_frames for d in cfg.stdha_offsets):
            raise ValueError(f"method.stdha_offsets: {cfg.stdha_offsets} must be smaller than frames={num_frames}")
        layers = range(depth) if cfg.adapter_layers is None else cfg.adapter_layers
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(f"method.adapter_layers: {list(layers)} must index blocks 0..{depth - 1}")
        self.layers = sorted(layers)
        self.stdha = nn.ModuleList(STDHA(cfg.stdha_offsets if i in self.layers else []) for i in range(depth))
        bottleneck = cfg.bottleneck or width // 4
        self.temporal_embedding = nn.Parameter(torch.zeros(num_frames, width))
        self.adapters: nn.ModuleDict | None = nn.ModuleDict(
            {
                str(i): nn.ModuleDict(
                    {s: LinearAdapter(width, bottleneck, cfg.adapter_scale, cfg.adapter_dropout) for s in ADAPTER_SLOTS}
                )
                for i in self.layers
            }
        )
        self.head = linear_head(width, num_classes, cfg.head_dropout, std=0.01)
        # As in the reference, the backbone's own ln_post trains: the merged tower then is exactly an open_clip tower.
        backbone.visual.ln_post.requires_grad_(True)
        self.grad_checkpointing = cfg.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"temporal_embedding"}

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs ZeRO-3 must gather while `module` runs: STDHA reads its block's in-projection."""
        return [
            (self.stdha[i], p)
            for i, blk in enumerate(self.backbone.blocks)
            for p in (blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        ]

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.backbone.blocks[i]
        ad = self.adapters[str(i)] if self.adapters is not None and str(i) in self.adapters else None

        def through(slot: str, h: torch.Tensor) -> torch.Tensor:
            return ad[slot](h) if ad is not None else h

        h = through("attn_out", self.stdha[i](blk.attn, through("attn_in", blk.ln_1(x)), self.num_frames))
        x = x + blk.ls_1(h)
        return x + blk.ls_2(through("mlp_out", blk.mlp(through("mlp_in", blk.ln_2(x)))))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        B, T = video.shape[:2]
        x = self.backbone.embed_tokens(video, temporal=self.temporal_embedding)  # (B*T, 1+L, D)
        for i in range(len(self.backbone.blocks)):
            if self.grad_checkpointing and self.training:
                x = checkpoint(self._block, i, x, use_reentrant=False)
            else:
                x = self._block(i, x)
        cls = self.backbone.visual.ln_post(x[:, 0]).unflatten(0, (B, T))  # (B, T, D)
        return self.head(cls.mean(1))

    @torch.no_grad()
    def merge(self) -> ZeroI2V:
        """Folds every adapter into its block's linear layers (in place) and removes the adapters.

        Uses the training `adapter_scale` stored on each adapter (a mismatched scale is what broke merged accuracy
        in leexinhao/ZeroI2V#7).
        """
        if self.adapters is None:
            return self
        for i, ad in self.adapters.items():
            blk = self.backbone.blocks[int(i)]
            ad["attn_in"].fold_before(blk.attn.in_proj_weight, blk.attn.in_proj_bias)
            ad["attn_out"].fold_after(blk.attn.out_proj.weight, blk.attn.out_proj.bias)
            ad["mlp_in"].fold_before(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
            ad["mlp_out"].fold_after(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
        self.adapters = None
        return self
