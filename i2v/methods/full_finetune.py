"""Full fine-tuning: the linear probe's model with every backbone parameter trainable (the memory ceiling).

Two regularisers of CLIP fine-tuning recipes: layer-wise lr decay (`method.layer_decay`: block i of L gets
decay ** (L + 1 - (i + 1)), the embeddings decay ** (L + 1), the final norm, projection and head 1), and stochastic
depth (`method.drop_path`: timm's DropPath on both residual branches of every block, rate rising linearly from 0 to
drop_path over the depth).
"""

from __future__ import annotations

import re

from timm.layers import DropPath
from torch import nn

from i2v.methods import register_method
from i2v.methods.linear_probe import LinearProbe

_BLOCK = re.compile(r"\.(?:resblocks|blocks)\.(\d+)\.")


@register_method("full_finetune")
class FullFinetune(LinearProbe):
    backbone_no_grad = False

    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        backbone.unfreeze()
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.drop_path > 0:
            blocks = backbone.blocks
            for i, block in enumerate(blocks):
                rate = cfg.drop_path * i / max(1, len(blocks) - 1)
                if backbone.is_native:  # open_clip: x + ls_1(attn(...)), x + ls_2(mlp(...))
                    block.ls_1 = nn.Sequential(block.ls_1, DropPath(rate))
                    block.ls_2 = nn.Sequential(block.ls_2, DropPath(rate))
                else:  # timm blocks (EVA): drop_path1 / drop_path2
                    block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.visual.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone.visual, "no_weight_decay", lambda: set())()
        return {f"backbone.visual.{n}" for n in nwd}

    def lr_scales(self) -> dict[str, float]:
        """Layer-decay lr factor per parameter name (read by `i2v.train.optim.param_groups`); all 1 at decay 1."""
        decay, depth = self.cfg.layer_decay, len(self.backbone.blocks)
        scales = {}
        for name, _ in self.named_parameters():
            if not name.startswith("backbone."):
                layer = depth + 1  # head
            elif m := _BLOCK.search(name):
                layer = int(m.group(1)) + 1
            elif any(k in name for k in ("ln_post", "proj", "trunk.norm", "fc_norm", "head")):
                layer = depth + 1
            else:  # patch embedding, class token, position embedding, ln_pre
                layer = 0
            scales[name] = decay ** (depth + 1 - layer)
        return scales
