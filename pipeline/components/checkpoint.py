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
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mcci_models.saved import CONFIG, MODEL_META, WEIGHTS
from pipeline.support.config import Config, to_dict
from pipeline.support.errors import CheckpointError

TRAINER_STATE = "trainer.json"
EMA_WEIGHTS = "ema.safetensors"
STEP_FOLDER = re.compile(r"step-\d{8}")


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


def step_folders(out: str | Path) -> list[Path]:
    """Every ``checkpoints/step-NNNNNNNN`` folder, complete or not, oldest first (not ``.tmp`` ones being written,
    nor the ``.old`` one a replacement moves aside)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir())


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Training-state checkpoints written to the end (``trainer.json`` is written last), oldest first."""
    return [p for p in step_folders(out) if (p / TRAINER_STATE).is_file()]


def _safetensors_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a damaged header
        return f"{path.name} is damaged ({' '.join(str(e).split())[:120]})"
    return None


def checkpoint_problem(folder: Path, num_processes: int) -> str | None:
    """Why a checkpoint folder cannot be resumed from, found without loading it: ``trainer.json`` missing,
    unreadable or of another step, or one of the files Accelerate (or DeepSpeed) and the EMA wrote missing or with a
    damaged header. What only loading finds (a truncated optimizer state) is caught when it is loaded."""
    try:
        trainer = json.loads((folder / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{TRAINER_STATE} is damaged ({e})"
    if not isinstance(trainer, dict) or trainer.get("step") != int(folder.name.split("-")[1]) \
            or not isinstance(trainer.get("epoch"), int):
        return f"{TRAINER_STATE} does not record this checkpoint's step and epoch"
    deepspeed = folder / "pytorch_model"
    if deepspeed.is_dir():  # DeepSpeed's own layout: a folder of model and optimizer states per rank
        names = [p.name for p in deepspeed.iterdir()]
        for kind in ("model_states", "optim_states"):
            if not any(kind in n for n in names):
                return f"pytorch_model/ holds no {kind} file"
    else:
        problem = _safetensors_problem(folder / WEIGHTS)
        if problem:
            return problem
        if not (folder / "optimizer.bin").is_file():
            return "optimizer.bin is missing"
    missing = [f"random_states_{i}.pkl" for i in range(num_processes) if not (folder / f"random_states_{i}.pkl").is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if (trainer.get("run") or {}).get("train.ema_decay", 0) > 0:
        return _safetensors_problem(folder / EMA_WEIGHTS)
    return None


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


def load_newest_checkpoint(accelerator, out: str | Path, check_run: Callable[[dict[str, Any] | None], None],
                           report: Callable[[str], Any] = print,
                           ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """The newest checkpoint that is complete and loads, restored (``load_training_state``): a damaged newest one
    falls back to the previous, saying which was skipped and why; None when there is no checkpoint folder at all.
    ``check_run`` sees each candidate's recorded run first (a changed config is refused there, not skipped). When
    checkpoints exist but none can be used the run stops: it never restarts from step 0 by itself. Under several
    processes a load that fails is not retried on an older checkpoint (a rank could be left with another's state)."""
    folders = step_folders(out)
    if not folders:
        return None
    skipped = []
    for folder in reversed(folders):
        problem = checkpoint_problem(folder, accelerator.num_processes)
        if problem is None:
            check_run(json.loads((folder / TRAINER_STATE).read_text()).get("run"))
            try:
                saved, ema = load_training_state(accelerator, folder)
            except Exception as e:  # noqa: BLE001 - torch, safetensors and DeepSpeed raise their own types
                problem = f"it does not load ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                if accelerator.num_processes > 1:
                    raise CheckpointError(f"cannot resume from {folder}: {problem}; move it out of "
                                          f"{folder.parent} to resume from the one before") from e
        if problem is None:
            if skipped:
                report(f"warning: skipped the newer checkpoint(s) {'; '.join(skipped)}; resuming from {folder.name} "
                       "(they are replaced when training reaches their step)")
            return folder, saved, ema
        skipped.append(f"{folder.name}: {problem}")
    raise CheckpointError(f"cannot resume: no checkpoint in {Path(out) / 'checkpoints'} can be used "
                          f"({'; '.join(skipped)}); restore them from a copy, or start a new run with another "
                          "train.out")
