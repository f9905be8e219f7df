"""Blended (Chen et al. 2017): a pattern image mixed into the whole image."""
from __future__ import annotations

import numpy as np

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError


@register("blended")
class Blended(Attack):
    """x' = (1 - alpha) x + alpha p. ``pattern_file``: the user's pattern image; default: a seeded
    uniform-noise pattern (BackdoorBench uses a picture; noise needs no asset).
    """

    defaults = {"alpha": 0.2, "pattern_file": None}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        alpha = float(self.params["alpha"])
        if not 0.0 < alpha < 1.0:
            raise ShardBuildError(f"blended alpha must be in (0, 1), got {alpha}")
        if self.params["pattern_file"] is not None:
            self.pattern = self.load_image_asset("pattern_file", image_size)
        else:
            self.pattern = self.rng(0xB1E).integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        alpha = float(self.params["alpha"])
        mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * self.pattern.astype(np.float32)
        return to_pixels(mixed)
