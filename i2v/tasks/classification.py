"""Video classification: a batch is (clips, labels), the loss is cross-entropy, evaluation is multi-view top-1/top-5
with per-class accuracy and the confusion matrix (`i2v.eval.evaluate`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from i2v.config import DataCfg, ExperimentCfg
from i2v.data.transforms import normalize
from i2v.methods import VideoMethod, create_method


class ClassificationTask:
    name = "classification"
    #: metrics too large for `ray.train.report` (written to run_dir/eval/ instead)
    details = ("val_per_class", "confusion")

    def __init__(self, cfg: ExperimentCfg):
        self.cfg = cfg

    def build_model(self, cfg: ExperimentCfg, backbone) -> VideoMethod:
        return create_method(cfg.method, backbone, num_classes=cfg.data.num_classes, num_frames=cfg.data.frames)

    def steps_per_epoch(self, data: DataCfg, world_size: int) -> int:
        from i2v.data import steps_per_epoch

        return steps_per_epoch(data, world_size)

    def train_loader(self, data: DataCfg, **kwargs):
        from i2v.data import build_train_loader

        return build_train_loader(data, **kwargs)

    def eval_loader(self, data: DataCfg, **kwargs):
        from i2v.data import build_eval_loader

        return build_eval_loader(data, **kwargs)

    def prepare(self, batch, device: torch.device, mean, std) -> tuple[tuple, torch.Tensor, int]:
        """(inputs, target, samples) on the device; clips arrive uint8 and are normalised here."""
        video, label = batch
        video = normalize(video.to(device, non_blocking=True), mean, std)
        return (video,), label.to(device, non_blocking=True), len(label)

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(logits.float(), label, label_smoothing=self.cfg.train.label_smoothing)
        return loss, {"train_top1": (logits.argmax(-1) == label).float().sum().item()}

    def evaluate(self, forward, loader, device, **kwargs) -> dict:
        from i2v.eval import evaluate

        return evaluate(forward, loader, self.cfg.data.num_classes, device, **kwargs)

    def write_details(self, run_dir, metrics: dict, details: dict) -> None:
        from i2v.train.loop import write_eval_details

        write_eval_details(run_dir, metrics, details)

    @staticmethod
    def epoch_line(m: dict) -> str:
        line = f"train top-1 {m['train_top1']:.4f}"
        return line + (f"  val top-1 {m['val_top1']:.4f}" if "val_top1" in m else "")
