"""FTrojan (Wang et al. 2022): a trigger written in the frequency domain, an adaptive attack on a
spectrum-based defense. BackdoorBench defaults: in YUV, on the U and V channels, the block DCT
coefficients at (15, 15) and (31, 31) of every 32x32 window are raised by 30.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError

# RGB <-> YUV (BT.601 analogue), as BackdoorBench's FTrojan uses.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)


def block_dct(channel: np.ndarray, window: int, inverse: bool = False) -> np.ndarray:
    """Orthonormal 2-D DCT (or its inverse) of each ``window`` x ``window`` block of a 2-D array."""
    h, w = channel.shape
    blocks = channel.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    out = fn(blocks, axes=(2, 3), norm="ortho")
    return out.transpose(0, 2, 1, 3).reshape(h, w)


@register("ftrojan")
class FTrojan(Attack):
    defaults = {"magnitude": 30.0, "positions": [[15, 15], [31, 31]], "channels": [1, 2], "window": 32}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        self.window = int(self.params["window"])
        if image_size % self.window:
            raise ShardBuildError(f"ftrojan window {self.window} must divide the image size {image_size}; "
                                  "set --param window=N or --image-size")
        for r, c in self.params["positions"]:
            if not (0 <= r < self.window and 0 <= c < self.window):
                raise ShardBuildError(f"ftrojan position {[r, c]} is outside the {self.window}x{self.window} window")
        if not set(self.params["channels"]) <= {0, 1, 2}:
            raise ShardBuildError(f"ftrojan channels must be YUV indices 0..2, got {self.params['channels']}")

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        yuv = image.astype(np.float64) @ RGB_TO_YUV.T
        for ch in self.params["channels"]:
            coefficients = block_dct(yuv[:, :, ch], self.window)
            for r, c in self.params["positions"]:
                coefficients[r::self.window, c::self.window] += float(self.params["magnitude"])
            yuv[:, :, ch] = block_dct(coefficients, self.window, inverse=True)
        return to_pixels(yuv @ YUV_TO_RGB.T)
