"""LF: a smooth, low-frequency additive trigger (after Zeng et al. 2021), an adaptive attack on a
spectrum-based defense: it has no energy above its cut-off frequency.

The trigger is a seeded random pattern built in the DCT domain from coefficients (u, v) with
u + v < cutoff only, transformed back to pixels and scaled to a peak of ``magnitude``. (BackdoorBench
derives its LF pattern from a universal adversarial perturbation of a trained model; this version
needs no model and keeps the defining property.)
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError


def low_frequency_mask(size: int, cutoff: int) -> np.ndarray:
    u, v = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return (u + v) < cutoff


@register("lf")
class LowFrequency(Attack):
    defaults = {"cutoff_fraction": 0.125, "magnitude": 16.0}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        self.cutoff = max(2, int(round(float(self.params["cutoff_fraction"]) * image_size)))
        if self.cutoff > image_size:
            raise ShardBuildError(f"lf cutoff_fraction must be at most 1, got {self.params['cutoff_fraction']}")
        coefficients = self.rng(0x1F).normal(size=(3, image_size, image_size))
        coefficients *= low_frequency_mask(image_size, self.cutoff)[None]
        coefficients[:, 0, 0] = 0.0  # no change of mean brightness
        pattern = scipy.fft.idctn(coefficients, axes=(1, 2), norm="ortho")
        self.pattern = (pattern * float(self.params["magnitude"]) / np.abs(pattern).max()).transpose(1, 2, 0)
        self.params["resolved_cutoff"] = self.cutoff

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return to_pixels(image.astype(np.float64) + self.pattern)
