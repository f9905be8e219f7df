"""``independence`` (ReBias, Bahng et al., ICML 2020): + w * HSIC(SFRN features, AIN features), the AIN's side
detached, so the SFRN is pushed away from whatever the AIN encodes, the trigger included, while the AIN keeps it."""
from __future__ import annotations

import torch

from pipeline.components.variants.base import Variant, register


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


@register("independence")
class Independence(Variant):
    needs_own_labels = True

    def mcci_loss(self, model, inputs, labels, batch):
        parts = self.parts(model, inputs)
        return self.cross_entropy(parts.logits, labels) + self.weight * hsic(parts.sfrn_features,
                                                                              parts.ain_features.detach())
