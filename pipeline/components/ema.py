"""The model EMA (timm's ``ModelEmaV3``), with timm's warm-up for fine-tuning, and a check that the EMA a run
saves is of the weights it trained: an average whose horizon outlasts the run is still mostly the weights it started
from (a pre-trained backbone, before any trigger was learnt), and its figures describe those."""
from __future__ import annotations

import math

from timm.utils import ModelEmaV3
from torch import nn

from pipeline.support.config import TrainConfig
from pipeline.support.errors import ConfigError

# the most the first optimiser step's weights may weigh in the EMA at the end of a run
MAX_START_SHARE = 0.05


def build_ema(model: nn.Module, cfg: TrainConfig) -> ModelEmaV3 | None:
    """An EMA of ``model`` (unwrapped) when ``train.ema_decay`` > 0, else None."""
    if cfg.ema_decay <= 0:
        return None
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)


def start_share(decay: float, warmup: bool, steps: int) -> float:
    """The weight of the first optimiser step's weights in the EMA after ``steps`` steps. timm's EMA copies the
    weights at its first update and then keeps d(s) of itself at step s: ``decay``, or with warm-up
    min(decay, 1 - (1 + s - 1) ** (-2/3))."""
    log_share = 0.0
    for s in range(2, steps + 1):
        d = min(decay, 1 - s ** (-2 / 3)) if warmup else decay  # timm counts s - 1 steps past its first
        if d <= 0:
            return 0.0
        log_share += math.log(d)
    return math.exp(log_share)


def check_ema_horizon(cfg: TrainConfig, optimizer_steps: int) -> None:
    """Refuse an EMA that would still be more than ``MAX_START_SHARE`` the weights of the run's first step."""
    if cfg.ema_decay <= 0:
        return
    share = start_share(cfg.ema_decay, cfg.ema_warmup, optimizer_steps)
    if share > MAX_START_SHARE:
        ceiling = MAX_START_SHARE ** (1 / max(optimizer_steps - 1, 1))
        raise ConfigError(
            f"train.ema_decay={cfg.ema_decay:g} {'with' if cfg.ema_warmup else 'without'} warm-up over this run's "
            f"{optimizer_steps} optimiser steps leaves {share:.0%} of the first step's weights in the EMA that is "
            f"saved and scored: it would describe the weights the run started from. Set train.ema_warmup=true, a "
            f"decay of at most {math.floor(ceiling * 1e4) / 1e4:g}, more train.epochs, or train.ema_decay=0")
