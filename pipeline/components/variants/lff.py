"""``lff`` (Learning from Failure, Nam et al., NeurIPS 2020), as measured in docs/RESULTS.md: the fused
cross-entropy plus w * (the SFRN alone's cross-entropy weighted per sample by CE_AIN / (CE_AIN + CE_SFRN), plus the
AIN alone's generalised cross-entropy). The GCE makes the AIN the shortcut learner that fits easy cues first;
samples it explains teach the SFRN's own term little. Both terms are added to the fused loss (the model's head is
shared), so the SFRN still learns every sample through it: the variant tilts the SFRN, it does not shield it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.components.variants.base import Variant, register

GCE_Q = 0.7  # LfF's generalised cross-entropy exponent


def generalised_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, q: float = GCE_Q) -> torch.Tensor:
    """(1 - p_y^q) / q per sample: emphasises samples already fitted, so a model trained with it
    learns the easiest cue first."""
    p = F.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0].clamp_min(1e-8)
    return (1 - p.pow(q)) / q


def lff_weights(sfrn_ce: torch.Tensor, ain_ce: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the SFRN's loss: high where the AIN fails, low where it explains the label."""
    return (ain_ce / (ain_ce + sfrn_ce + 1e-8)).detach()


@register("lff")
class LearningFromFailure(Variant):
    needs_own_labels = True

    def mcci_loss(self, model, inputs, labels, batch):
        parts = self.parts(model, inputs)
        sfrn_ce = F.cross_entropy(parts.sfrn_logits.float(), labels, reduction="none")
        ain_ce = F.cross_entropy(parts.ain_logits.float(), labels, reduction="none")
        shortcut = generalised_cross_entropy(parts.ain_logits, labels).mean()
        return self.cross_entropy(parts.logits, labels) + self.weight * (
            (lff_weights(sfrn_ce, ain_ce) * sfrn_ce).mean() + shortcut)
