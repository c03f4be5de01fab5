"""Video data for i2v: WebDataset shards of encoded videos, packed once, streamed to training and evaluation.

    i2v data pack --list train.csv --root videos/ --out shards/train     # i2v.data.pack
    i2v data synth --out data/synth                                       # i2v.data.synth
    loader = build_train_loader(cfg.data, rank=r, world_size=w, seed=s)
    for video, label in loader:                                           # (B, T, C, H, W) uint8, (B,) int64
        video = normalize(video.to(device, non_blocking=True), CLIP_MEAN, CLIP_STD)  # float32, on the device
    loader.skipped.summary()                                              # corrupt samples skipped so far

See docs/data.md. Names are imported lazily so `import i2v.data` (the CLI, config validation) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_train_loader": "i2v.data.wds",
    "build_eval_loader": "i2v.data.wds",
    "steps_per_epoch": "i2v.data.wds",
    "read_label_map": "i2v.data.wds",
    "read_shard_index": "i2v.data.wds",
    "count_samples": "i2v.data.wds",
    "expand_shards": "i2v.data.wds",
    "deal_shards": "i2v.data.wds",
    "SkipCounter": "i2v.data.wds",
    "VideoLoader": "i2v.data.wds",
    "CLIP_MEAN": "i2v.data.transforms",
    "CLIP_STD": "i2v.data.transforms",
    "normalize": "i2v.data.transforms",
    "train_transform": "i2v.data.transforms",
    "eval_transform": "i2v.data.transforms",
    "make_synthetic": "i2v.data.synth",
    "make_captioned": "i2v.data.synth_captions",
    "captions_of": "i2v.data.retrieval",
    "read_metas": "i2v.data.retrieval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'i2v.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
