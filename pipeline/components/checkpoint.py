"""Checkpoints, written atomically.

Two kinds:
- the trained model, ``<out>/model/`` (read back by ``mcci_models.saved``): ``model.safetensors`` (weights and the mind-control
  reference buffers), ``config.yaml`` (the resolved job config) and ``model.json`` (class names,
  image size, the attack target, how the reference was made). Loading never unpickles anything.
- resumable training state, ``<out>/checkpoints/step-NNNNNNNN/``: Accelerate's ``save_state``
  (model, optimizer, scheduler, scaler, RNG), ``ema.safetensors`` when the run keeps an EMA, plus
  ``trainer.json`` (epoch, step, the run's identity), which is written last: a folder without it is
  incomplete and ignored.

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

from mcci_models.saved import CONFIG, MODEL_META, WEIGHTS
from pipeline.support.config import Config, to_dict

TRAINER_STATE = "trainer.json"
EMA_WEIGHTS = "ema.safetensors"


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


def save_model(directory: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any],
               other_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """The model folder, atomically: ``state_dict`` as ``model.safetensors``, ``other_weights`` (file name -> state
    dict, e.g. the raw weights beside an EMA) beside it, the config and ``meta``."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, weights in {WEIGHTS: state_dict, **(other_weights or {})}.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / name))
    (tmp / CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (tmp / MODEL_META).write_text(json.dumps(meta, indent=1))
    replace_dir(tmp, final)
    return final


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete training-state checkpoints, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / TRAINER_STATE).is_file())


def save_training_state(accelerator, out: str | Path, trainer_state: dict[str, Any], keep: int,
                        ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Accelerate's full state plus ``trainer.json`` (and the EMA weights, as safetensors), atomically;
    keeps the newest ``keep``."""
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
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA_WEIGHTS))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
        replace_dir(tmp, final)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """``trainer.json`` and the EMA weights (None if the run kept none), after Accelerate restored the rest."""
    accelerator.load_state(str(checkpoint))
    ema = load_file(str(checkpoint / EMA_WEIGHTS)) if (checkpoint / EMA_WEIGHTS).is_file() else None
    return json.loads((checkpoint / TRAINER_STATE).read_text()), ema
