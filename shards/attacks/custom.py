"""A user's own trigger: an image, an optional mask, a blending weight and a position.

x' = (1 - alpha m) x + alpha m p inside the trigger's window. ``mask_file`` is a greyscale image
(white = trigger, black = keep the input; grey blends); without one the whole trigger window is used.
``size``: [height, width] to resize the trigger and mask to (default: the trigger file's own size).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from shards.attacks.base import Attack, register, stamp
from shards.errors import ShardBuildError


@register("custom")
class CustomTrigger(Attack):
    defaults = {"trigger_file": None, "mask_file": None, "alpha": 1.0, "position": "bottom-right", "size": None}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if self.params["trigger_file"] is None:
            raise ShardBuildError("attack 'custom' needs --param trigger_file=PATH (and optionally mask_file, alpha, "
                                  "position, size)")
        size = self.params["size"]
        if size is None:
            with Image.open(self.asset_path("trigger_file")) as im:
                size = (im.height, im.width)
        self.set_trigger(self.load_image_asset("trigger_file", tuple(size)), self.mask_from_params(tuple(size)))

    def mask_from_params(self, shape: tuple[int, int]) -> np.ndarray:
        if self.params["mask_file"] is None:
            return np.ones(shape, np.float64)
        return self.load_image_asset("mask_file", shape, mode="L").astype(np.float64) / 255.0

    def set_trigger(self, patch: np.ndarray, mask: np.ndarray) -> None:
        alpha = float(self.params["alpha"])
        if not 0.0 < alpha <= 1.0:
            raise ShardBuildError(f"{self.name} alpha must be in (0, 1], got {alpha}")
        if patch.shape[0] > self.image_size or patch.shape[1] > self.image_size:
            raise ShardBuildError(f"{self.name} trigger {patch.shape[0]}x{patch.shape[1]} is larger than the "
                                  f"{self.image_size} px image; set --param size=[h,w]")
        self.patch, self.mask, self.alpha = patch, mask, alpha
        self.row, self.col = self.place(patch.shape[:2], self.params["position"])
        self.params["resolved_position"] = [self.row, self.col]

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return stamp(image, self.patch, self.mask, self.alpha, self.row, self.col)
