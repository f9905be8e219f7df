"""Experiment trackers through Accelerate (``log_with``): TensorBoard by default when installed,
W&B or MLflow when named. Only the main process writes."""
from __future__ import annotations

import importlib.util
from typing import Any

from pipeline.support.config import Config, keys
from pipeline.support.errors import ConfigError

# tracker name -> (module that must import, what to install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def resolve_trackers(names: tuple[str, ...]) -> list[str]:
    """``auto`` -> TensorBoard if installed; ``none`` -> none; a named tracker must be installed."""
    if "none" in names:
        return []
    chosen = []
    for name in names:
        if name == "auto":
            chosen += [n for n in ("tensorboard",) if importlib.util.find_spec(TRACKERS[n][0])]
        elif name not in TRACKERS:
            raise ConfigError(f"train.trackers names {name!r}; choose from auto, none, {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            raise ConfigError(f"train.trackers names {name!r}, which is not installed; pip install "
                              f"{TRACKERS[name][1]} or set train.trackers=[none]")
        else:
            chosen.append(name)
    return sorted(set(chosen))


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys with scalar values, as trackers take hyper-parameters."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, _, value in keys(cfg)}
