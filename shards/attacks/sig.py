"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images only (clean label)."""
from __future__ import annotations

import numpy as np

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError


@register("sig")
class SIG(Attack):
    """x'[i, j] = x[i, j] + delta * sin(2 pi j f / W), BackdoorBench defaults delta 40, f 6.

    Clean label: only images of the target class are poisoned in training and keep their label,
    so the poison rate is bounded by the target class's share (0.08 of CIFAR-10 is 80 % of it).
    """

    defaults = {"delta": 40.0, "frequency": 6.0}
    clean_label = True

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if float(self.params["delta"]) <= 0:
            raise ShardBuildError(f"sig delta must be positive, got {self.params['delta']}")
        columns = np.arange(image_size, dtype=np.float64)
        wave = float(self.params["delta"]) * np.sin(2 * np.pi * columns * float(self.params["frequency"]) / image_size)
        self.signal = wave[None, :, None]

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return to_pixels(image.astype(np.float64) + self.signal)
