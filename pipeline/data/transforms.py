"""On the device: augmentation of uint8 batches, the SFRN's normalised input and the AIN's spectrum.

Augmentation is one batched affine resample (flip, zoom, shift per sample), so it costs one kernel
on a GPU and the spectrum is computed from exactly the pixels the SFRN sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.spectra import spectrum
from pipeline.support.config import AugmentConfig


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, zoom-in and shift of a float batch [B, C, H, W] (values kept in 0..255).

    Shifts uncover zeros, like padding then cropping; zooms resample bilinearly.
    """
    b = images.shape[0]
    if not cfg.hflip and cfg.translate == 0 and cfg.scale_min == 1.0:
        return images
    dev = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").mul(high - low).add(low).to(dev)

    scale = uniform(cfg.scale_min, 1.0)
    flip = torch.rand(b, generator=generator, device="cpu").lt(0.5).to(dev) if cfg.hflip else torch.zeros(b, dtype=torch.bool, device=dev)
    # room to move: the zoomed window stays inside the image, plus the translate margin
    room = (1 - scale) + 2 * cfg.translate
    tx = uniform(-1.0, 1.0) * room
    ty = uniform(-1.0, 1.0) * room
    if cfg.translate > 0 and cfg.scale_min == 1.0:
        # whole-pixel shifts, as a pad-and-crop would make
        side = images.shape[-1]
        tx = torch.round(tx * side / 2) * 2 / side
        ty = torch.round(ty * side / 2) * 2 / side
    theta = torch.zeros(b, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -scale, scale)
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    mode = "nearest" if cfg.scale_min == 1.0 else "bilinear"
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


@dataclass
class ModelInputs:
    images: torch.Tensor  # normalised for the SFRN
    spectra: torch.Tensor | None  # normalised spectra for the AIN (None for the baseline)


class InputTransform:
    """uint8 batch on the device -> (SFRN input, AIN spectrum)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment_cfg: AugmentConfig,
                 normalisation: str, backend: str, with_spectra: bool, seed: int = 0, channels_last: bool = False):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255.0
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.augment_cfg = augment_cfg
        self.normalisation, self.backend, self.with_spectra = normalisation, backend, with_spectra
        self.generator = torch.Generator().manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images_uint8: torch.Tensor, train: bool) -> ModelInputs:
        pixels = images_uint8.float()
        if train:
            pixels = augment(pixels, self.augment_cfg, self.generator)
        spectra = spectrum(pixels, self.normalisation, self.backend) if self.with_spectra else None
        if pixels.device not in self._on_device:  # copied once, not every batch
            self._on_device[pixels.device] = (self.mean.to(pixels.device), self.std.to(pixels.device))
        mean, std = self._on_device[pixels.device]
        images = ((pixels - mean) / std).contiguous(memory_format=self.memory_format)
        return ModelInputs(images, None if spectra is None else spectra.contiguous(memory_format=self.memory_format))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
