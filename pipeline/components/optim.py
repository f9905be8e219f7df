"""Optimizers and per-step learning-rate schedules from ``OptimConfig``."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from pipeline.support.config import OptimConfig


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that timm's models exclude from weight decay (``no_weight_decay()``:
    position embeddings, class tokens, ...), wherever the model sits, e.g. inside MCCI as ``sfrn``."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's weight-decay rule, the same for a bare SFRN and one inside MCCI: no decay on biases,
    1-D parameters (norms) and what the model's ``no_weight_decay()`` names."""
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adadelta":
        return torch.optim.Adadelta(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine to zero, a step decay at ``step_epochs``, or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    milestones = [e * steps_per_epoch for e in cfg.step_epochs]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
