"""FTrojan (Wang et al. 2022): a trigger written in the frequency domain, an adaptive attack on a
spectrum-based defense. BackdoorBench defaults (config/attack/ftrojannn/default.yaml): the
orthonormal block DCT coefficients at (15, 15) and (31, 31) of every 32x32 window of channels 1 and 2
are raised by 30.

The colour space is OpenCV's YCrCb (``cv2.COLOR_RGB2YCrCb``: 0 = Y, 1 = Cr, 2 = Cb), which is what
both the authors' code (SoftWiser-group/FTrojan, image.py) and BackdoorBench
(utils/bd_img_transform/ftrojann.py) call "YUV". Until 2026-11-29 this file used the analogue YUV
matrix (U = 0.492 (B - Y), V = 0.877 (R - Y)), which puts the same coefficient change into RGB with
other weights (R x 0.81, B x 1.15 of the reference's) and swaps the roles of channels 1 and 2.

The trigger is tiny in pixels (a peak of about 6 levels, RMS about 2) and sits in the highest
frequencies of the chroma channels, exactly what JPEG quantises hardest: ``lossless`` tells the
shard builder to store it as PNG at every size (shards/build.py), as BackdoorBench keeps it in memory.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from shards.attacks.base import Attack, register, to_pixels
from shards.errors import ShardBuildError

# RGB -> YCrCb as OpenCV documents COLOR_RGB2YCrCb (BT.601, full range, offset 128 on Cr and Cb):
# Y = 0.299 R + 0.587 G + 0.114 B, Cr = 0.713 (R - Y) + 128, Cb = 0.564 (B - Y) + 128.
_Y = np.array([0.299, 0.587, 0.114])
RGB_TO_YCRCB = np.stack([_Y, 0.713 * (np.array([1.0, 0, 0]) - _Y), 0.564 * (np.array([0, 0, 1.0]) - _Y)])
YCRCB_TO_RGB = np.linalg.inv(RGB_TO_YCRCB)
YCRCB_OFFSET = np.array([0.0, 128.0, 128.0])


def rgb_to_ycrcb(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ RGB_TO_YCRCB.T + YCRCB_OFFSET


def ycrcb_to_rgb(ycrcb: np.ndarray) -> np.ndarray:
    return (ycrcb - YCRCB_OFFSET) @ YCRCB_TO_RGB.T


def block_dct(channel: np.ndarray, window: int, inverse: bool = False) -> np.ndarray:
    """Orthonormal 2-D DCT (or its inverse) of each ``window`` x ``window`` block of a 2-D array
    (the scaling of OpenCV's ``cv2.dct``, which the reference code uses)."""
    h, w = channel.shape
    blocks = channel.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    out = fn(blocks, axes=(2, 3), norm="ortho")
    return out.transpose(0, 2, 1, 3).reshape(h, w)


@register("ftrojan")
class FTrojan(Attack):
    defaults = {"magnitude": 30.0, "positions": [[15, 15], [31, 31]], "channels": [1, 2], "window": 32}
    lossless = True

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
            raise ShardBuildError(f"ftrojan channels must be YCrCb indices 0..2 (0 Y, 1 Cr, 2 Cb), "
                                  f"got {self.params['channels']}")

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        ycrcb = rgb_to_ycrcb(image)
        for ch in self.params["channels"]:
            coefficients = block_dct(ycrcb[:, :, ch], self.window)
            for r, c in self.params["positions"]:
                coefficients[r::self.window, c::self.window] += float(self.params["magnitude"])
            ycrcb[:, :, ch] = block_dct(coefficients, self.window, inverse=True)
        return to_pixels(ycrcb_to_rgb(ycrcb))
