"""Linear probe: the frozen image model's embedding of every frame, averaged over time, then one linear layer.

The weakest temporal baseline: it is invariant to frame order, so it stays at chance on order-only tasks.
With num_classes=0 (retrieval) it returns the frozen tower's per-frame embeddings through trainable copies of
`ln_post` / `proj` (B, T, E): CLIP4Clip with a frozen ViT, the frame-averaging baseline (`retrieval.interaction`);
`full_finetune` (a subclass) back-propagates into the tower there too: CLIP4Clip itself.
"""

from __future__ import annotations

import torch

from i2v.layers import FrameProjection, linear_head
from i2v.methods import register_method
from i2v.methods.base import VideoMethod


@register_method("linear_probe")
class LinearProbe(VideoMethod):
    backbone_no_grad = True

    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        if num_classes:
            self.head = linear_head(backbone.output_dim, num_classes, cfg.head_dropout)
        else:
            self.frame_proj = FrameProjection(backbone)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if not self.num_classes:  # the last block's class token of every frame, through ln_post / proj
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_no_grad):  # full_finetune: grad
                _, prefix = self.backbone(video, [len(self.backbone.blocks) - 1])
            return self.frame_proj(prefix[-1][:, :, 0])  # (B, T, E)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_no_grad):
            feats = self.backbone(video, pooled=True)  # (B, T, E)
        return self.head(feats.mean(1).to(self.head[1].weight.dtype))
