"""Optimizers and per-step learning-rate schedules from ``OptimConfig``."""
from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
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


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What fine-tuning adds to a pre-trained SFRN: its classifier and, for MCCI, the AIN and fusion head."""
    sfrn = getattr(model, "sfrn", model)
    added = list(sfrn.get_classifier().parameters()) if hasattr(sfrn, "get_classifier") else []
    if sfrn is not model:  # MCCI
        added += [*model.ain.parameters(), *model.head.parameters()]
    return added


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The pre-trained SFRN's body: every parameter ``new_parameters`` does not name."""
    new = {id(p) for p in new_parameters(model)}
    return [p for p in model.parameters() if id(p) not in new]


def freeze_sfrn(model: nn.Module, frozen: bool) -> None:
    """The AIN's warm-up (``optim.ain_warmup_epochs``): MCCI's whole SFRN, its new classifier too, takes no gradient
    and keeps its BatchNorm statistics; ``frozen=False`` gives its parameters their gradients back."""
    for p in model.sfrn.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        for module in model.sfrn.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def freeze_body(model: nn.Module, frozen: bool) -> None:
    """The linear probe (``optim.probe_epochs``): the body takes no gradient (so it is neither computed, nor in the
    global clip, nor seen by the optimiser, whose moments and weight decay skip it) and its BatchNorm statistics stay
    as they are; ``frozen=False`` lets it train again (``set_train_mode`` decides its BatchNorm mode then)."""
    for p in body_parameters(model):
        p.requires_grad_(not frozen)
    if frozen:  # the classifier a timm model gets at fine-tuning is linear: every BatchNorm of the SFRN is the body's
        for module in getattr(model, "sfrn", model).modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per (weight decay, LR scale, role). Weight decay follows timm's rule, the same for a
    bare SFRN and one inside MCCI: none on biases, 1-D parameters (norms) and what the model's
    ``no_weight_decay()`` names. ``layer_decay < 1`` scales the SFRN body's LR per block with timm's
    layer map; parameters new at fine-tuning take ``head_lr_scale``. Each group's ``lr`` is set, so
    the schedule multiplies the right base."""
    decay_of = {id(p): group["weight_decay"] for group in param_groups_weight_decay(
        model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model)) for p in group["params"]}
    sfrn = getattr(model, "sfrn", model)  # MCCI's backbone, or the bare SFRN
    layer_scale: dict[int, float] = {}
    if cfg.layer_decay < 1.0:
        for group in param_groups_layer_decay(sfrn, cfg.weight_decay, layer_decay=cfg.layer_decay):
            layer_scale.update({id(p): group["lr_scale"] for p in group["params"]})
    new = {id(p) for p in new_parameters(model)}
    buckets: dict[tuple[float, float, str], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = decay_of[id(p)]
        role = "new" if id(p) in new else "body"
        scale = cfg.head_lr_scale if role == "new" else layer_scale.get(id(p), 1.0)
        buckets.setdefault((decay, scale, role), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_scale": scale, "role": role, "lr": cfg.lr * scale}
            for (decay, scale, role), params in buckets.items()]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adadelta":
        return torch.optim.Adadelta(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per step: linear warmup, then cosine to zero, a step decay at ``step_epochs``, or constant.
    With ``probe_epochs`` (or ``ain_warmup_epochs``, the longer), the body's groups hold LR 0 while it waits and start
    their warmup after."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    probe = int(max(cfg.probe_epochs, cfg.ain_warmup_epochs) * steps_per_epoch)
    milestones = [e * steps_per_epoch for e in cfg.step_epochs]

    def factor(step: int, start: int = 0) -> float:
        if step < start:
            return 0.0
        if step - start < warmup:
            return (step - start + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - start - warmup) / max(1, total_steps - start - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    def body(step: int) -> float:
        return factor(step, probe)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [body if group.get("role") == "body" and probe else factor for group in optimizer.param_groups])
