"""The training objective: cross-entropy of the model as trained, plus, for MCCI, an optional
variant term that pushes what the AIN explains out of the SFRN (docs/VARIANTS.md says why).

- ``independence`` (ReBias, Bahng et al., ICML 2020): + w * HSIC(SFRN features, AIN features),
  the AIN's side detached, so the SFRN is pushed away from whatever the AIN encodes.
- ``lff`` (Learning from Failure, Nam et al., NeurIPS 2020): the AIN alone is trained as the
  shortcut learner with the generalised cross-entropy (it fits easy, shortcut samples first), and
  the SFRN alone gets a cross-entropy weighted per sample by CE_AIN / (CE_AIN + CE_SFRN): samples the
  AIN explains easily teach the SFRN little.
- ``isolate`` (Anti-Backdoor Learning, Li et al., NeurIPS 2021, with the audit's rule as the isolator):
  plain MCCI until ``train.isolate_epoch``, when ``pipeline/components/isolation.py`` flags the training
  samples whose label only the AIN explains; from then on those samples leave the cross-entropy and the
  SFRN alone climbs their loss, bounded at chance: - w * min(CE_SFRN, log K) (``unlearning_loss``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mcci_models.mcci import MCCIParts
from pipeline.data.transforms import ModelInputs

VARIANTS = ("none", "independence", "lff", "isolate")
GCE_Q = 0.7  # LfF's generalised cross-entropy exponent


def _gaussian_gram(x: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(x, x).pow(2)
    bandwidth = distances.detach().median().clamp_min(1e-6)  # the median heuristic
    return torch.exp(-distances / bandwidth)


def hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The biased HSIC estimator with Gaussian kernels: ~0 for independent features, larger for dependent."""
    n = x.shape[0]
    centre = torch.eye(n, device=x.device) - 1.0 / n
    kx, ky = _gaussian_gram(x.float()), _gaussian_gram(y.float())
    return torch.trace(kx @ centre @ ky @ centre) / (n - 1) ** 2


def generalised_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, q: float = GCE_Q) -> torch.Tensor:
    """(1 - p_y^q) / q per sample: emphasises samples already fitted, so a model trained with it
    learns the easiest cue first."""
    p = F.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0].clamp_min(1e-8)
    return (1 - p.pow(q)) / q


def lff_weights(sfrn_ce: torch.Tensor, ain_ce: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the SFRN's loss: high where the AIN fails, low where it explains the label."""
    return (ain_ce / (ain_ce + sfrn_ce + 1e-8)).detach()


def unlearning_loss(parts: MCCIParts, labels: torch.Tensor, flagged: torch.Tensor, label_smoothing: float = 0.0,
                    weight: float = 1.0) -> torch.Tensor:
    """The batch mean of, per sample: the fused cross-entropy where ``flagged`` (bool [B]) is false; where it
    is true, - w * min(CE of the SFRN alone, log K): gradient ascent on the SFRN's half only (mind control
    cuts the AIN's anyway), which stops once the SFRN gives the flagged label no more than chance (1/K): it
    cannot diverge, and a clean sample flagged by mistake only loses its label's excess probability
    instead of being taught another label (as relabelling it would)."""
    fused = F.cross_entropy(parts.logits.float(), labels, label_smoothing=label_smoothing, reduction="none")
    chance = math.log(parts.logits.shape[1])
    ascent = F.cross_entropy(parts.sfrn_logits.float(), labels, reduction="none").clamp(max=chance)
    return torch.where(flagged, -weight * ascent, fused).mean()


def training_loss(model: nn.Module, inputs: ModelInputs, labels: torch.Tensor, label_smoothing: float = 0.0,
                  variant: str = "none", weight: float = 1.0, flagged: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the model as trained (MCCI with each input's own spectrum), plus the variant term.
    A mixed batch (``inputs.targets``, already smoothed by timm's Mixup) is scored against its soft labels.
    ``flagged`` (``isolate`` after its switch): a bool mask of the batch's isolated samples; before the
    switch (None) ``isolate`` is plain MCCI."""
    if inputs.targets is not None:
        if variant != "none":
            raise ValueError("the MCCI variants need each sample's own label; mixup/cutmix give soft labels")
        labels, label_smoothing = inputs.targets, 0.0
    if inputs.spectra is None:
        return F.cross_entropy(model(inputs.images).float(), labels, label_smoothing=label_smoothing)
    if variant == "none" or (variant == "isolate" and flagged is None):
        return F.cross_entropy(model(inputs.images, inputs.spectra).float(), labels, label_smoothing=label_smoothing)
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    if variant == "isolate":
        return unlearning_loss(parts, labels, flagged, label_smoothing, weight)
    loss = F.cross_entropy(parts.logits.float(), labels, label_smoothing=label_smoothing)
    if variant == "independence":
        return loss + weight * hsic(parts.sfrn_features, parts.ain_features.detach())
    sfrn_ce = F.cross_entropy(parts.sfrn_logits.float(), labels, reduction="none")
    ain_ce = F.cross_entropy(parts.ain_logits.float(), labels, reduction="none")
    shortcut = generalised_cross_entropy(parts.ain_logits, labels).mean()
    return loss + weight * ((lff_weights(sfrn_ce, ain_ce) * sfrn_ce).mean() + shortcut)
