"""`i2v export`: the inference model of a checkpoint as one safetensors file.

Keys are the method's own, with the backbone under open_clip's names: `visual.*` is exactly an open_clip vision
tower state dict (`open_clip.create_model(...).visual` loads it), the rest is the method's head / side network.
For ZeroI2V the adapters are merged first, so the file holds a plain ViT + head (+ the temporal embedding).
The experiment config rides along in the metadata; `load_exported` rebuilds the model from the file alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from i2v.backbone import skip_init
from i2v.config import ExperimentCfg
from i2v.methods import VideoMethod, create_model

FORMAT = "i2v-export-v1"


def export(checkpoint: str | Path, out: str | Path, overrides: list[str] = ()) -> dict:
    from i2v.eval import load_trained

    model, cfg = load_trained(checkpoint, overrides)
    model = model.merge()
    cfg.backbone = model.backbone.pinned_cfg(cfg.backbone)  # the file is rebuilt without backbone.pretrained
    tensors = {k.removeprefix("backbone."): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT, "method": cfg.method.name, "config": json.dumps(cfg.to_dict())})
    os.replace(tmp, out)
    return {"out": str(out), "tensors": len(tensors), "params": sum(v.numel() for v in tensors.values())}


def load_exported(path: str | Path) -> VideoMethod:
    """Rebuilds an exported model (weights from the file only; nothing is downloaded)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an i2v export (metadata format {meta.get('format')!r}, expected {FORMAT})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = ExperimentCfg.from_dict(json.loads(meta["config"]), source=str(path))
    cfg.backbone.pretrained = None
    with skip_init():  # every weight comes from the file
        model = create_model(cfg).merge()
    model.load_state_dict({f"backbone.{k}" if k.startswith("visual.") else k: v for k, v in tensors.items()})
    return model.eval()
