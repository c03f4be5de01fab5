"""Named search spaces: small YAML files mirroring the experiment config tree (`tune/spaces/NAME.yaml`).

    space = load_space("bottleneck", method="side4video")
    # {"method.side_width": tune.grid_search([64, 128, 256, 320]), "train.lr": tune.loguniform(1e-4, 3e-3)}

Under `method:` a space lists one entry per method name; only the entry of the config's method is used, so one
space ("sweep the bottleneck") serves every method with its own knob. Keys come back as dotted config paths, the
same strings `i2v train` takes as overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import tune

from i2v.config import METHOD_CFGS, ConfigError, ExperimentCfg, apply_overrides

SPACES_DIR = Path(__file__).parent / "spaces"
DOMAINS = {
    "grid": lambda v: tune.grid_search(list(v)),
    "choice": lambda v: tune.choice(list(v)),
    "loguniform": lambda v: tune.loguniform(float(v[0]), float(v[1])),
    "uniform": lambda v: tune.uniform(float(v[0]), float(v[1])),
}


def list_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name: str, method: str) -> dict[str, Any]:
    """A space by name (tune/spaces/NAME.yaml) or path, as {dotted key: Tune domain} for `method`."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPACES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--space: {name!r} is neither a named space ({', '.join(list_spaces())}) nor a YAML file")
    raw = yaml.safe_load(path.read_text()) or {}
    if "method" in raw:
        if not set(raw["method"]) <= set(METHOD_CFGS):
            raise ConfigError(f"{path}: method: unknown methods {sorted(set(raw['method']) - set(METHOD_CFGS))}")
        if method not in raw["method"]:
            raise ConfigError(f"{path}: has no entry for method {method!r} (it covers {sorted(raw['method'])})")
        raw = raw | {"method": raw["method"][method]}
    flat = {}
    _flatten(raw, "", flat, path)
    return flat


def _flatten(node: dict, prefix: str, out: dict, path: Path) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS:
            kind, arg = next(iter(value.items()))
            out[dotted] = DOMAINS[kind](arg)
        elif isinstance(value, dict):
            _flatten(value, f"{dotted}.", out, path)
        else:
            raise ConfigError(
                f"{path}: {dotted}: expected one of {sorted(DOMAINS)}, e.g. {{grid: [1, 2]}}; got {value}"
            )


def with_overrides(base: dict, params: dict[str, Any], source: str = "trial") -> ExperimentCfg:
    """The experiment config of one trial: base config dict + sampled {dotted key: value}."""
    import copy

    raw = apply_overrides(copy.deepcopy(base), [f"{k}={_yaml_value(v)}" for k, v in params.items()])
    return ExperimentCfg.from_dict(raw, source=source)


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
