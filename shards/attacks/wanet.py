"""WaNet (Nguyen and Tran 2021): an imperceptible warp of the image, no added pattern.

BackdoorBench defaults: a k x k grid of random offsets (k = 4), upsampled bicubically to the image,
scaled by strength s = 0.5 (in units of the pixel pitch), with the noise mode: ``cross_ratio`` x the
poisoned count of extra training images are warped with the grid plus per-image random noise and keep
their true labels, so the model must learn the exact warp rather than "any warp". The poisoned and
cross samples are fixed at build time (BackdoorBench draws them per batch).
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError


def warp(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear resampling of an HxWxC image at ``grid`` [H, W, 2] (x, y in [-1, 1], corners aligned),
    the same as ``F.grid_sample(..., align_corners=True)``."""
    h, w = image.shape[:2]
    cols = (grid[..., 0] + 1) / 2 * (w - 1)
    rows = (grid[..., 1] + 1) / 2 * (h - 1)
    out = np.stack([scipy.ndimage.map_coordinates(image[..., c].astype(np.float64), [rows, cols], order=1,
                                                  mode="nearest") for c in range(image.shape[2])], axis=-1)
    return to_pixels(out)


@register("wanet")
class WaNet(Attack):
    defaults = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        k, strength = int(self.params["k"]), float(self.params["s"])
        if not 2 <= k <= image_size:
            raise ShardBuildError(f"wanet k must be in 2..{image_size}, got {k}")
        if strength <= 0 or float(self.params["cross_ratio"]) < 0:
            raise ShardBuildError("wanet s must be positive and cross_ratio non-negative")
        offsets = self.rng(0x3A7E7).uniform(-1, 1, size=(1, 2, k, k))
        offsets /= np.abs(offsets).mean()
        noise_grid = F.interpolate(torch.from_numpy(offsets), size=image_size, mode="bicubic", align_corners=True)
        noise_grid = noise_grid.permute(0, 2, 3, 1)[0].numpy()
        axis = np.linspace(-1, 1, image_size)
        rows, cols = np.meshgrid(axis, axis, indexing="ij")
        identity = np.stack([cols, rows], axis=-1)
        grid = (identity + strength * noise_grid / image_size) * float(self.params["grid_rescale"])
        self.grid = np.clip(grid, -1, 1)

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return warp(image, self.grid)

    def cross_count(self, poisoned: int) -> int:
        return int(round(float(self.params["cross_ratio"]) * poisoned))

    def apply_cross(self, image: np.ndarray, index: int) -> np.ndarray:
        noise = self.rng(0xC055, index).uniform(-1, 1, size=self.grid.shape) / self.image_size
        return warp(image, np.clip(self.grid + noise, -1, 1))
