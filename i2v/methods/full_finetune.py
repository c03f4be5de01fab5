"""Full fine-tuning: the linear probe's model with every backbone parameter trainable (the memory ceiling)."""

from __future__ import annotations

from i2v.methods import register_method
from i2v.methods.linear_probe import LinearProbe


@register_method("full_finetune")
class FullFinetune(LinearProbe):
    backbone_no_grad = False

    def __init__(self, cfg, backbone, num_classes, num_frames):
        super().__init__(cfg, backbone, num_classes, num_frames)
        backbone.unfreeze()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.visual.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.backbone.visual, "no_weight_decay", lambda: set())()
        return {f"backbone.visual.{n}" for n in nwd}
