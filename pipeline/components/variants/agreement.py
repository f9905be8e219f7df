"""``agreement``: the SFRN learns a sample only as far as its own prediction agrees with the label.

A pre-trained SFRN reads an image's content long before it learns a trigger: within the first steps its half of the
head predicts the content class of most images, poisoned ones included, whose label (the target) the content
contradicts. Plain MCCI still asks the SFRN to raise the target on them, and a pre-trained SFRN slowly learns the
trigger (a patch, an image-wide texture) to do so. Here the fused cross-entropy is unchanged in value, but each
sample's gradient into the SFRN and its half of the head is scaled by how far the SFRN alone agrees with the label:

    share_i = (1 - (max_k p_sfrn(k) - p_sfrn(y_i))) ** w

``p_sfrn`` is the softmax of the SFRN's half of the head alone (``MCCIParts.sfrn_logits``). A sample whose label the
SFRN ranks first keeps its whole gradient, and so does every sample while the SFRN is unsure (its new head near
uniform at the first steps: the gate starts open and closes as the content is learned); one whose content the SFRN
confidently reads as another class (a poisoned sample, or a hard or mislabelled clean one) gives the SFRN little,
while the AIN and its half of the head learn from it in full, as in MCCI. The SFRN therefore never gets the signal it
would need to start predicting the target from a trigger: a fixed point that the ``residual`` variant, whose gate
waits for the AIN to explain the label, does not have. (A ratio p_sfrn(y) / max_k p_sfrn(k) instead closes the gate
on every sample a random new head happens to rank low, and the AIN then learns the content.)
``train.mcci_variant_weight`` is the exponent w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcci_models.mcci import MCCIParts
from pipeline.components.variants.base import SFRNGate, register


def agreement_shares(parts: MCCIParts, labels: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Per sample, (1 - (max_k p_sfrn(k) - p_sfrn(label))) ** exponent from the SFRN's half of the head alone,
    detached."""
    with torch.no_grad():
        p = F.softmax(parts.sfrn_logits.float(), dim=1)
        return (1 - (p.max(dim=1).values - p.gather(1, labels[:, None])[:, 0])).pow(exponent)


@register("agreement")
class Agreement(SFRNGate):
    def shares(self, parts, labels):
        return agreement_shares(parts, labels, self.weight)
