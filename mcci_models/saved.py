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
    """The folder holding the model files: ``directory`` itself or, for a training run, its ``model/``. What is
    missing is named in the folder that lacks it (a run's ``model/``, not the run)."""
    d = Path(directory)
    if d.is_file():
        raise ModelError(f"{directory} is a file; give the out folder of `mcci train` or its model/ folder "
                         f"(here perhaps {d.parent})")
    if (d / MODEL_DIR).is_dir():
        d = d / MODEL_DIR
    missing = [n for n in (WEIGHTS, CONFIG, MODEL_META) if not (d / n).is_file()]
    if missing:
        where = f"{d} lacks {', '.join(missing)}" if d != Path(directory) else f"missing {', '.join(missing)}"
        raise ModelError(f"{directory} is not a trained mcci model ({where}); give the out folder of `mcci train` or "
                         "its model/ folder" + ("; an interrupted run is continued with train.resume=true"
                                                if d != Path(directory) and WEIGHTS in missing else ""))
    return d


def _damaged(path: Path, problem: str) -> ModelError:
    return ModelError(f"{path} {problem}; the model folder was edited or damaged: copy it again from the run that "
                      "saved it")


def _check_meta(d: Path, config: dict[str, Any], meta: Any) -> None:
    """What the jobs read from ``model.json``, and its agreement with ``config.yaml``: an edited class list or size
    would otherwise build a model of another shape or name the wrong classes, silently."""
    path = d / MODEL_META
    if not isinstance(meta, dict):
        raise _damaged(path, "does not hold a JSON object")
    names, size, count = meta.get("class_names"), meta.get("image_size"), meta.get("num_classes")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise _damaged(path, f"has num_classes {count!r}, not a number of classes")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _damaged(path, "has class_names that are not a list of names")
    if names is not None and count != len(names):
        raise _damaged(path, f"says num_classes {count} but names {len(names)} classes")
    if not (isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 4096):
        raise _damaged(path, f"has image_size {size!r}, not a number of pixels")
    defense = (config.get("train") or {}).get("defense")
    if meta.get("defense", defense) != defense:
        raise _damaged(path, f"says defense {meta.get('defense')!r}, its {CONFIG} {defense!r}")


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
    """(config as a plain mapping in today's keys, metadata) of a saved model, without its weights; a file that does
    not parse, or says what the other contradicts, is one error naming it."""
    d = model_folder(directory)
    try:
        config = yaml.safe_load((d / CONFIG).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _damaged(d / CONFIG, f"cannot be read as YAML ({' '.join(str(e).split())[:160]})") from e
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(config.get("train"), dict)):
        raise _damaged(d / CONFIG, "does not hold the model and train sections of a job config")
    try:
        meta = json.loads((d / MODEL_META).read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(d / MODEL_META, f"cannot be read as JSON ({e})") from e
    _check_meta(d, config, meta)
    try:
        return upgrade_config(config), meta
    except (KeyError, TypeError) as e:
        raise _damaged(d / CONFIG, f"lacks the key {e}") from e


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
    if not path.is_file():
        raise _damaged(path, f"is missing ({MODEL_META} names it as the model's {kind} weights)")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path} is not a valid safetensors file: {e}") from e
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # every prediction would be garbage, without a word
        raise _damaged(path, f"holds non-finite values (nan or inf) in {', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}")
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
    try:
        model = create_model_from_config(config, meta["num_classes"], meta["image_size"], load_pretrained=False)
    except (KeyError, TypeError, ValueError) as e:  # ModelError (a ValueError) names its own problem
        if isinstance(e, ModelError):
            raise
        raise _damaged(model_folder(directory) / CONFIG, f"does not describe a model ({type(e).__name__}: {e})") from e
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelError(f"{directory}: weights do not match its config ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), config, meta
