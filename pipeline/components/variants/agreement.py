"""``agreement``: the SFRN learns a sample only as far as its own prediction agrees with the label.

A pre-trained SFRN reads an image's content long before it learns a trigger: within the first steps its half of the
head predicts the content class of most images, poisoned ones included, whose label (the target) the content
contradicts. Plain MCCI still asks the SFRN to raise the target on them, and a pre-trained SFRN slowly learns the
trigger (a patch, an image-wide texture) to do so. Here the fused cross-entropy is unchanged in value, but each
sample's gradient into the SFRN and its half of the head is scaled by how far the SFRN alone agrees with the label:

    share_i = (p_sfrn(y_i) / max_k p_sfrn(k)) ** w

``p_sfrn`` is the softmax of the SFRN's half of the head alone (``MCCIParts.sfrn_logits``). A sample whose label the
SFRN already ranks first keeps its whole gradient; one whose content points elsewhere (a poisoned sample, or a hard
or mislabelled clean one) gives the SFRN little, while the AIN and its half of the head learn from it in full, as in
MCCI. The SFRN therefore never gets the signal it would need to start predicting the target from a trigger: a fixed
point that the ``residual`` variant, whose gate waits for the AIN to explain the label, does not have. At the first
steps the new head is near uniform (every share near 1), so the gate starts open and closes as the content is
learned. ``train.mcci_variant_weight`` is the exponent w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcci_models.mcci import MCCIParts
from pipeline.components.variants.base import SFRNGate, register


def agreement_shares(parts: MCCIParts, labels: torch.Tensor, exponent: float = 1.0) -> torch.Tensor:
    """Per sample, (p_sfrn(label) / max_k p_sfrn(k)) ** exponent from the SFRN's half of the head alone, detached."""
    with torch.no_grad():
        log_p = F.log_softmax(parts.sfrn_logits.float(), dim=1)
        gap = log_p.max(dim=1).values - log_p.gather(1, labels[:, None])[:, 0]
        return torch.exp(-exponent * gap)


@register("agreement")
class Agreement(SFRNGate):
    def shares(self, parts, labels):
        return agreement_shares(parts, labels, self.weight)
