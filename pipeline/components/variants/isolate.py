"""``isolate`` (Anti-Backdoor Learning, Li et al., NeurIPS 2021, with the audit's rule as the isolator): plain MCCI
until ``train.isolate_epoch``, when ``pipeline/components/isolation.py`` flags training samples (``train.isolate_by``);
from then on a flagged sample leaves the cross-entropy and the SFRN's half of the head climbs its loss, bounded at
chance: - w * min(CE of the SFRN's half, log K) (``unlearning_loss``). The head's bias, which both halves share, is
kept out of the ascent: lowering the flagged label's bias would be the cheapest way up, a class-prior shift for
every input rather than unlearning."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mcci_models.mcci import MCCIParts
from pipeline.components.isolation import ISOLATION, describe_isolation, isolate
from pipeline.components.variants.base import EpochContext, Variant, register
from pipeline.support.errors import CheckpointError, ConfigError
from pipeline.support.report import write_json


def sfrn_logits_without_bias_gradient(parts: MCCIParts) -> torch.Tensor:
    """The SFRN's half of the head (with the bias), its gradient reaching the SFRN and its weights only."""
    bias = (parts.logits - parts.sfrn_term - parts.ain_term).detach()
    return parts.sfrn_term + bias


def unlearning_loss(parts: MCCIParts, labels: torch.Tensor, flagged: torch.Tensor, label_smoothing: float = 0.0,
                    weight: float = 1.0) -> torch.Tensor:
    """The batch mean of, per sample: the fused cross-entropy where ``flagged`` (bool [B]) is false; where it
    is true, - w * min(CE of the SFRN's half, log K): gradient ascent on the SFRN's half only (mind control
    cuts the AIN's anyway), which stops once the SFRN gives the flagged label no more than chance (1/K): it
    cannot diverge, and a clean sample flagged by mistake only loses its label's excess probability
    instead of being taught another label (as relabelling it would)."""
    fused = F.cross_entropy(parts.logits.float(), labels, label_smoothing=label_smoothing, reduction="none")
    chance = math.log(parts.logits.shape[1])
    ascent = F.cross_entropy(sfrn_logits_without_bias_gradient(parts).float(), labels,
                             reduction="none").clamp(max=chance)
    return torch.where(flagged, -weight * ascent, fused).mean()


@register("isolate")
class Isolate(Variant):
    needs_own_labels = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.isolate_epoch = cfg.train.isolate_epoch
        self.record: dict[str, Any] | None = None  # the switch's record, None before it
        self.flagged: torch.Tensor | None = None  # the isolated sample indices, on the device

    def check(self, cfg, sharded):
        if sharded:
            raise ConfigError("train.mcci_variant=isolate scores every training sample with the whole model on each "
                              "rank; ZeRO-3 and FSDP shard the parameters: use DDP / ZeRO-2, or another "
                              "train.mcci_variant")

    def mcci_loss(self, model, inputs, labels, batch):
        if self.flagged is None:  # before the switch: plain MCCI
            return super().mcci_loss(model, inputs, labels, batch)
        flagged = torch.isin(batch.indices.to(self.flagged.device), self.flagged)
        return unlearning_loss(self.parts(model, inputs), labels, flagged, self.label_smoothing, self.weight)

    def end_of_epoch(self, context: EpochContext, epoch: int) -> None:
        if epoch + 1 != self.isolate_epoch:
            return
        record = {"epoch": epoch + 1, "step": context.step,
                  **isolate(context.model, context.cfg, context.manifest, context.transform, context.device,
                            context.autocast)}
        self._set(record, context)
        context.print(describe_isolation(record))
        truth = record.get("recorded_poisoned", {})
        context.log({"isolation/flagged": record["flagged"],
                     **{f"isolation/{k}": truth[k] for k in ("precision", "recall") if k in truth}})

    def _set(self, record: dict[str, Any], context: EpochContext) -> None:
        self.record = record
        self.flagged = torch.tensor(record["flagged_indices"], dtype=torch.long, device=context.device)
        if context.is_main:
            write_json(context.out / ISOLATION, record)

    def state_dict(self):
        return self.record

    def load_state_dict(self, state, context, start_epoch):
        if state is None:
            if start_epoch >= self.isolate_epoch:
                raise CheckpointError("the checkpoint was written after the isolation epoch but holds no isolated "
                                      "samples; start a new run with another train.out")
            return
        self._set(state, context)
