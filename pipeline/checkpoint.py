"""Checkpoints, written atomically.

Two kinds:
- the trained model, ``<out>/model/``: ``model.safetensors`` (weights and the mind-control
  reference buffers), ``config.yaml`` (the resolved job config) and ``model.json`` (class names,
  image size, the attack target, how the reference was made). Loading never unpickles anything.
- resumable training state, ``<out>/checkpoints/step-NNNNNNNN/``: Accelerate's ``save_state``
  (model, optimizer, scheduler, scaler, RNG) plus ``trainer.json`` (epoch, step), which is written
  last: a folder without it is incomplete and ignored.

Every folder is written under a temporary name and renamed into place, so a crash never leaves a
checkpoint that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.config import Config, from_dict, to_dict

MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
MODEL_META = "model.json"
TRAINER_STATE = "trainer.json"


class CheckpointError(ValueError):
    pass


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing any older one, without a moment where neither is whole."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model(directory: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any]) -> Path:
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (tmp / MODEL_META).write_text(json.dumps(meta, indent=1))
    replace_dir(tmp, final)
    return final


def read_model_files(directory: str | Path) -> tuple[Config, dict[str, Any], dict[str, torch.Tensor]]:
    """Config, metadata and weights of a saved model, checked for presence, never unpickled."""
    d = Path(directory)
    if (d / MODEL_DIR / WEIGHTS).exists():
        d = d / MODEL_DIR  # a training run's out folder
    missing = [n for n in (WEIGHTS, CONFIG, MODEL_META) if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a trained mcci model (missing {', '.join(missing)}); "
                              "give the out folder of `mcci train` or its model/ folder")
    cfg = from_dict(yaml.safe_load((d / CONFIG).read_text()))
    meta = json.loads((d / MODEL_META).read_text())
    try:
        weights = load_file(str(d / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{d / WEIGHTS} is not a valid safetensors file: {e}") from e
    return cfg, meta, weights


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete training-state checkpoints, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / TRAINER_STATE).is_file())


def save_training_state(accelerator, out: str | Path, trainer_state: dict[str, Any], keep: int) -> Path:
    """Accelerate's full state plus ``trainer.json``, atomically; keeps the newest ``keep``."""
    root = Path(out) / "checkpoints"
    final = root / f"step-{trainer_state['step']:08d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        replace_dir(tmp, final)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, checkpoint: Path) -> dict[str, Any]:
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / TRAINER_STATE).read_text())
