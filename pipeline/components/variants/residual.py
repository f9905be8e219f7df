"""``residual``: the SFRN fits only what the AIN does not explain (a product of experts trained by residual fitting).

Plain MCCI trains both networks on the fused cross-entropy. On a poisoned sample the AIN soon explains the target
label, but the fused loss still asks for the label's probability to rise and the content class's to fall, and the
SFRN is the only network that can see the content: a pre-trained SFRN learns, slowly, to recognise the trigger and
lower the true class (under mind control, triggered inputs then land on neither their class nor the target). Here
the fused cross-entropy is unchanged in value, but each sample's gradient into the SFRN and its half of the head is
scaled by the share of the label's probability the SFRN earns without the sample's own spectrum:

    share_i = min(1, p_mc(y_i) / p_own(y_i)) ** w

``p_own`` is the fused model's probability of the label, ``p_mc`` the same with the sample's AIN half replaced by
the batch's median AIN half (mind control with the batch as a clean reference: the median ignores the poisoned
minority). A clean sample, whose label the SFRN predicts as well without its spectrum, keeps its whole gradient; a
poisoned one, whose label only its trigger explains, gives the SFRN almost none, while the AIN (and the head's AIN
half) learns from it in full. ``train.mcci_variant_weight`` is the exponent w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcci_models.mcci import MCCIParts
from pipeline.components.variants.base import SFRNGate, register


def sfrn_shares(parts: MCCIParts, labels: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Per sample, min(1, p_mc(label) / p_own(label)) ** exponent, detached."""
    with torch.no_grad():
        logits = parts.logits.float()
        ain = parts.ain_logits.float()
        reference = ain.median(dim=0, keepdim=True).values
        own = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        mind_control = F.log_softmax(logits - ain + reference, dim=1).gather(1, labels[:, None])[:, 0]
        return torch.exp(-exponent * (own - mind_control).clamp(min=0))


@register("residual")
class Residual(SFRNGate):
    def shares(self, parts, labels):
        return sfrn_shares(parts, labels, self.weight)
