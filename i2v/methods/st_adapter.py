"""ST-Adapter (Pan, Lin, Zhu, Qiao, Li; NeurIPS 2022, arXiv 2206.13559): depthwise-3D-conv bottleneck adapters on
the residual stream inside the frozen ViT blocks. Gradients flow through every frozen block after the first adapter.

    video (B, T, C, H, W) -> tokens (B*T, 1+L, D) -> blocks, each: [adapter] -> attn -> [adapter] -> MLP
    -> class token of every frame (B, T, D) -> mean over T -> ln_post (frozen) -> Dropout -> Linear -> (B, K)

`position`: "pre_attn" (paper figure), "pre_mlp" (released K400 preset 12x384), "both" (released SSv2 preset 24x384).
`adapter_layers=N` puts adapters in the last N blocks. At initialisation (zero conv) the model is exactly the frozen
image model with this head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from i2v.layers import STAdapter, linear_head
from i2v.methods import register_method
from i2v.methods.base import VideoMethod


@register_method("st_adapter")
class STAdapterMethod(VideoMethod):
    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        backbone.require_native("st_adapter")
        depth, width = len(backbone.blocks), backbone.width
        n = depth if cfg.adapter_layers is None else cfg.adapter_layers
        if not 0 < n <= depth:
            raise ValueError(f"method.adapter_layers: {n} must be in [1, {depth}] for a {depth}-block backbone")
        if cfg.kernel_t % 2 == 0:
            raise ValueError(f"method.kernel_t: {cfg.kernel_t} must be odd (the conv pads symmetrically in time)")

        def adapters(enabled: bool) -> nn.ModuleList:
            return nn.ModuleList(
                STAdapter(width, cfg.bottleneck, backbone.grid_size, cfg.kernel_t)
                if enabled and i >= depth - n
                else nn.Identity()
                for i in range(depth)
            )

        self.pre_attn = adapters(cfg.position in ("pre_attn", "both"))
        self.pre_mlp = adapters(cfg.position in ("pre_mlp", "both"))
        self.head = linear_head(width, num_classes, cfg.head_dropout, std=0.02)
        self.grad_checkpointing = cfg.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk, T = self.backbone.blocks[i], self.num_frames
        if isinstance(self.pre_attn[i], STAdapter):
            x = self.pre_attn[i](x, T)
        x = x + blk.ls_1(blk.attention(blk.ln_1(x)))
        if isinstance(self.pre_mlp[i], STAdapter):
            x = self.pre_mlp[i](x, T)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        B, T = video.shape[:2]
        x = self.backbone.embed_tokens(video)  # (B*T, 1+L, D)
        for i in range(len(self.backbone.blocks)):
            if self.grad_checkpointing and self.training:
                x = checkpoint(self._block, i, x, use_reentrant=False)
            else:
                x = self._block(i, x)
        cls = x[:, 0].unflatten(0, (B, T)).mean(1)  # (B, D)
        return self.head(self.backbone.visual.ln_post(cls))
