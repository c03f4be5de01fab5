"""Cohort training: K configurations of side-network methods trained on one frozen-backbone forward per batch.

    cfg = load_config("configs/smoke.yaml", ["train.cohort=[{method.side_width: 32}, {train.lr: 1.0e-3}]"])
    member_configs(cfg)          # one ExperimentCfg per member: the run that member would be alone

A member's config is the cohort's config with `train.cohort` emptied and the member's overrides applied. Members may
differ only in `method.*` and the optimiser keys `MEMBER_TRAIN_KEYS`; everything that fixes the backbone, the data
and their order, the partition, the seed and the length of the schedule belongs to the whole cohort. Each member
then ends with the weights of its solo run (tests/test_cohort.py): members share no trainable parameter, each has
its own optimizer, schedule, gradient clipping and dropout RNG stream, and the backbone outputs they share are the
ones each would have computed (`VideoBackbone.shared_outputs`). Only methods that never back-propagate into the
backbone can share it this way.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import yaml

from i2v.config import ConfigError, ExperimentCfg, apply_overrides

# train.* keys a member may set; the rest of train (epochs, seed, workers, accumulation, ...) is the cohort's
MEMBER_TRAIN_KEYS = (
    "lr",
    "weight_decay",
    "warmup_epochs",
    "warmup_start",
    "schedule",
    "grad_clip",
    "label_smoothing",
    "lr_mult",
    "wd_exempt",
)


def is_member_key(key: str) -> bool:
    """Whether a dotted config key may differ between the members of one cohort."""
    section, _, name = key.partition(".")
    return section == "method" or (section == "train" and name in MEMBER_TRAIN_KEYS)


def yaml_value(v: Any) -> str:
    """`v` as the YAML text of a `key=value` override."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def member_configs(cfg: ExperimentCfg) -> list[ExperimentCfg]:
    """The solo config of every member of `cfg`'s cohort (`[cfg]` when it has none); ConfigError on a key members may
    not set, on a method that back-propagates into the backbone, or on halving without validation data."""
    if not cfg.train.cohort:
        if cfg.train.cohort_halving:
            raise ConfigError("train.cohort_halving: set, but train.cohort is empty (halving needs cohort members)")
        return [cfg]
    if cfg.train.cohort_halving and not cfg.data.val_shards:
        raise ConfigError("train.cohort_halving: ranks members by val top-1, so it needs data.val_shards")
    from i2v.methods import METHODS

    base = cfg.to_dict()
    base["train"].update(cohort=[], cohort_halving=0)
    out = []
    for i, overrides in enumerate(cfg.train.cohort):
        where = f"train.cohort[{i}]"
        for key in overrides:
            if not is_member_key(key):
                raise ConfigError(
                    f"{where}: {key}: members may differ only in method.* and train.{{{', '.join(MEMBER_TRAIN_KEYS)}}}"
                    f"; {key} is shared by the whole cohort (set it outside train.cohort)"
                )
        raw = apply_overrides(copy.deepcopy(base), [f"{k}={yaml_value(v)}" for k, v in overrides.items()])
        member = ExperimentCfg.from_dict(raw, source=where)
        if member.method.name not in METHODS:
            raise ConfigError(f"{where}: method.name: unknown method {member.method.name!r}")
        if not METHODS[member.method.name].backbone_no_grad:
            shared = sorted(n for n, m in METHODS.items() if m.backbone_no_grad)
            raise ConfigError(
                f"{where}: method {member.method.name} back-propagates into the backbone; cohort members share one "
                f"no-grad backbone forward, so they must be side networks ({', '.join(shared)})"
            )
        out.append(member)
    return out


def rungs(epochs: int, factor: int) -> list[int]:
    """Epochs after which in-cohort successive halving ranks the members: 1, f, f^2, ... before the last epoch."""
    if factor < 2:
        return []
    return [factor**k for k in range(math.ceil(math.log(epochs, factor)) + 1) if factor**k < epochs]


def survivors(scores: dict[int, float], factor: int) -> set[int]:
    """Members (index -> val top-1) that go on after a rung: the best ceil(n / factor), ties to the lower index."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return set(ranked[: math.ceil(len(ranked) / factor)])
