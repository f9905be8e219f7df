"""BadNets (Gu et al. 2017): a fixed patch stamped onto the image."""
from __future__ import annotations

import numpy as np

from shards.attacks.base import Attack, register, stamp
from shards.errors import ShardBuildError

# The reference 3x3 pattern for 32 px images, on every channel.
REFERENCE_PATTERN = np.array([[255, 0, 255], [0, 0, 0], [255, 0, 255]], dtype=np.uint8)
SMALL_IMAGE = 64


@register("badnets")
class BadNets(Attack):
    """``pattern_file``: a user's patch image (its own size, or ``patch_size``); default: the
    reference 3x3 pattern up to 64 px, and above that a seeded random patch of ``patch_fraction`` of
    the side. ``position``: ``bottom-right`` or ``[row, col]`` of the patch's top-left corner.
    """

    defaults = {"pattern_file": None, "patch_size": None, "patch_fraction": 0.1, "position": "bottom-right"}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        size = self.params["patch_size"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ShardBuildError(f"badnets --param patch_size={size!r} must be a whole number of pixels >= 1")
        # a parameter the chosen patch never reads is refused, not accepted and ignored
        if "patch_size" in self.given and self.params["pattern_file"] is None:
            raise ShardBuildError("badnets --param patch_size sizes a pattern_file; without one the patch is the "
                                  "reference 3x3 pattern (up to 64 px) or patch_fraction of the side: give "
                                  "--param pattern_file=PNG, or use patch_fraction above 64 px")
        if "patch_fraction" in self.given and self.params["pattern_file"] is None and image_size <= SMALL_IMAGE:
            raise ShardBuildError(f"badnets --param patch_fraction is not used at {image_size} px: up to "
                                  f"{SMALL_IMAGE} px the patch is the reference 3x3 pattern; give --param "
                                  "pattern_file=PNG (with patch_size or patch_fraction) for another patch")
        if self.params["pattern_file"] is not None:
            size = int(self.params["patch_size"] or max(3, round(self.params["patch_fraction"] * image_size)))
            self.patch = self.load_image_asset("pattern_file", size)
        elif image_size <= SMALL_IMAGE:
            self.patch = np.repeat(REFERENCE_PATTERN[:, :, None], 3, axis=2)
        else:
            side = max(3, round(self.params["patch_fraction"] * image_size))
            self.patch = self.rng(0xBAD).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        self.row, self.col = self.place(self.patch.shape[:2], self.params["position"])
        ph, pw = self.patch.shape[:2]
        self.params["resolved_position"] = [self.row, self.col]
        self.params["resolved_patch_shape"] = [ph, pw]
        self.opaque = np.ones((ph, pw))

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return stamp(image, self.patch, self.opaque, 1.0, self.row, self.col)
