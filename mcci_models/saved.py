"""A trained model's folder, as ``mcci train`` writes it: ``model.safetensors`` (weights and the
mind-control reference), ``config.yaml`` (the job's resolved config) and ``model.json`` (classes,
image size, attack, reference, and ``weights``: which weights ``model.safetensors`` holds, ``raw`` or ``ema``).
A run that kept an EMA saves the EMA there and its raw weights in ``raw.safetensors`` (``other_weights``), each
with its own mind-control reference.

Reading it lives beside the networks, so whatever needs a trained model (evaluation, or the attacks
that optimise against a clean model) takes one without the training code. Nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from mcci_models.factory import ain_in_chans, create_model
from mcci_models.sfrn import ModelError

MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "raw.safetensors"
WEIGHT_KINDS = ("raw", "ema")
CONFIG = "config.yaml"
MODEL_META = "model.json"


def default_device() -> torch.device:
    """Where a model runs when the user names no device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_folder(directory: str | Path) -> Path:
    """The folder holding the model files: ``directory`` itself or, for a training run, its ``model/``."""
    d = Path(directory)
    if (d / MODEL_DIR / WEIGHTS).exists():
        d = d / MODEL_DIR
    missing = [n for n in (WEIGHTS, CONFIG, MODEL_META) if not (d / n).is_file()]
    if missing:
        raise ModelError(f"{directory} is not a trained mcci model (missing {', '.join(missing)}); "
                         "give the out folder of `mcci train` or its model/ folder")
    return d


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's keys: models saved before ``model.pretrained`` named its source
    (``pretrained: bool`` plus ``weights_file``) still load."""
    m = config["model"]
    if "weights_file" in m:
        weights_file = m.pop("weights_file")
        m["pretrained"] = weights_file or ("hub" if m["pretrained"] is True else "none")
    return config


def weight_kinds(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """Which weights a saved model holds, kind -> file: its own (``model.json``'s ``weights``; a model saved before
    the key holds the EMA if its run kept one, else the raw weights), then ``other_weights``."""
    own = meta.get("weights") or ("ema" if config["train"].get("ema_decay", 0) > 0 else "raw")
    return {own: WEIGHTS, **meta.get("other_weights", {})}


def read_model_description(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config as a plain mapping in today's keys, metadata) of a saved model, without its weights."""
    d = model_folder(directory)
    return upgrade_config(yaml.safe_load((d / CONFIG).read_text())), json.loads((d / MODEL_META).read_text())


def read_saved_model(directory: str | Path, weights: str | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config as a plain mapping in today's keys, metadata, weights) of a saved model; ``weights``: ``raw`` or
    ``ema`` (None: the model's own, ``model.safetensors``). The metadata's ``weights`` names the kind returned."""
    d = model_folder(directory)
    config, meta = read_model_description(d)
    kinds = weight_kinds(meta, config)
    kind = weights or next(iter(kinds))
    if kind not in kinds:
        raise ModelError(f"{directory} holds {' and '.join(kinds)} weights, not {kind}"
                         + (" (its run kept no EMA: train.ema_decay=0)" if kind == "ema" else ""))
    path = d / kinds[kind]
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path} is not a valid safetensors file: {e}") from e
    return config, {**meta, "weights": kind}, state


def create_model_from_config(config: Mapping[str, Any], num_classes: int, image_size: int,
                             load_pretrained: bool = True, log: Callable[[str], None] = print) -> nn.Module:
    """The network a job config describes (its ``model`` section and ``train.defense``);
    ``load_pretrained=False`` for one whose weights come from a saved model. The AIN's input channels follow
    ``model.ain_view`` (models saved before it existed saw the spectrum alone)."""
    m = config["model"]
    return create_model(config["train"]["defense"], m["sfrn"], num_classes, image_size,
                        pretrained=m["pretrained"] if load_pretrained else "none", feature_dim=m["feature_dim"],
                        ain_widths=tuple(m["ain_widths"]), ain_dropouts=tuple(m["ain_dropouts"]),
                        # absent in configs saved before these keys
                        ain_stem_stride=m.get("ain_stem_stride", 0), drop_path_rate=m.get("drop_path_rate", 0.0),
                        ain_kind=m.get("ain", "conv"), ain_matched_grid=m.get("ain_matched_grid", 16),
                        in_chans=ain_in_chans(m.get("ain_view", "spectrum")), log=log)


def load_saved_model(directory: str | Path, device: torch.device, weights: str | None = None,
                     ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model in eval mode on ``device``, its config mapping, its metadata); ``weights`` as ``read_saved_model``."""
    config, meta, weights = read_saved_model(directory, weights)
    model = create_model_from_config(config, meta["num_classes"], meta["image_size"], load_pretrained=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelError(f"{directory}: weights do not match its config ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), config, meta
