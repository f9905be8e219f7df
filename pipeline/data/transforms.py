"""On the device: augmentation of uint8 batches, the SFRN's normalised input and the AIN's input (the
spectrum and, with ``model.ain_view=spectrum+lowpass``, a low-passed copy of the SFRN's input).

Augmentation is one batched affine resample (flip, random-resized crop, shift per sample), so it
costs one kernel on a GPU and the spectrum is computed from exactly the pixels the SFRN sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup

from pipeline.data.spectra import spectrum
from pipeline.support.config import AugmentConfig


CROP_ATTEMPTS = 10  # boxes timm's RandomResizedCropAndInterpolation tries before its fallback


def affine_theta(shape: torch.Size, cfg: AugmentConfig, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """Per sample, the [2, 3] matrix with which ``F.affine_grid`` maps the output onto its input window.

    The window is timm's ``RandomResizedCrop`` box: its area a fraction of the image's, uniform in
    [``scale_min``, 1]; its aspect ratio (width / height in pixels) log-uniform in ``ratio``; the first
    of ``CROP_ATTEMPTS`` draws that fits in the image, else the whole image cut to the nearest allowed
    ratio; placed uniformly inside the image and up to ``translate`` beyond it. In ``affine_grid``'s
    -1..1 coordinates the window's half-sizes are ``|theta[:, 0, 0]|`` (negative: mirrored) and
    ``theta[:, 1, 1]``, its centre ``theta[:, :, 2]``.
    """
    b, height, width = shape[0], shape[-2], shape[-1]
    crop = cfg.scale_min < 1.0
    attempts = CROP_ATTEMPTS if crop else 1
    # Every number of the batch in one draw on the generator's device: no host copy, no sync. The rows
    # come in the order of the earlier per-row draws, so without a crop (its area row drawn and
    # unused) the stream, and so earlier runs, repeat exactly.
    rows = [attempts, int(cfg.hflip), 2, attempts if crop else 0]
    area_u, flip_u, shift_u, aspect_u = torch.rand(sum(rows), b, generator=generator, device=device).split(rows)
    flip = flip_u[0].lt(0.5) if cfg.hflip else torch.zeros(b, dtype=torch.bool, device=device)
    shift_x, shift_y = shift_u.mul(2.0).add(-1.0)
    if crop:
        area = area_u.mul(1.0 - cfg.scale_min).add(cfg.scale_min)
        low, high = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        aspect = aspect_u.mul(high - low).add(low).exp()
        # half-sizes in -1..1 coordinates: the window's width (height) over the image's
        half_w = (area * aspect * height / width).sqrt()
        half_h = (area / aspect * width / height).sqrt()
        fits = (half_w <= 1.0) & (half_h <= 1.0)
        first = fits.int().argmax(0, keepdim=True)  # argmax returns the first of equal maxima
        fallback_ratio = min(max(width / height, cfg.ratio[0]), cfg.ratio[1])  # of the whole-image fallback
        found = fits.any(0)
        half_w = torch.where(found, half_w.gather(0, first)[0], min(1.0, fallback_ratio * height / width))
        half_h = torch.where(found, half_h.gather(0, first)[0], min(1.0, width / (fallback_ratio * height)))
    else:
        half_w = half_h = torch.ones(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(flip, -half_w, half_w)
    theta[:, 1, 1] = half_h
    # room to move: the window stays inside the image, plus the translate margin on each side
    theta[:, 0, 2] = shift_x * ((1 - half_w) + 2 * cfg.translate)
    theta[:, 1, 2] = shift_y * ((1 - half_h) + 2 * cfg.translate)
    return theta


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, random-resized crop and shift of a float batch [B, C, H, W] (values kept in 0..255).

    Without a crop, sampling is nearest: flips and shifts move whole pixels. Crops resample
    bilinearly and read only the image's own pixels (its border beyond the edge, as a crop of the
    image would); shifts uncover zeros, like padding then cropping. ``generator`` must be on the
    images' device.
    """
    if not cfg.hflip and cfg.translate == 0 and cfg.scale_min == 1.0:
        return images
    theta = affine_theta(images.shape, cfg, generator, images.device).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest" if cfg.scale_min == 1.0 else "bilinear",
                         padding_mode="zeros" if cfg.translate > 0 else "border", align_corners=False)


def lowpass_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """A spatially low-passed copy of a batch [B, C, H, W], in fp32: each cell of a ``size`` x ``size`` grid
    averaged (area downsampling), then upsampled back to H x W (bilinear). Patterns finer than a cell
    average out (a checkerboard patch aligned to the cells vanishes); smooth image-wide ones (SIG's
    stripes, Refool's reflections) stay."""
    height, width = images.shape[-2:]
    with torch.autocast(device_type=images.device.type, enabled=False):
        cells = F.adaptive_avg_pool2d(images.float(), (min(size, height), min(size, width)))
        return F.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False)


@dataclass
class ModelInputs:
    images: torch.Tensor  # normalised for the SFRN
    # the AIN's input (None for the baseline): normalised spectra, and with a low-pass view its channels after
    spectra: torch.Tensor | None
    targets: torch.Tensor | None = None  # soft labels of a mixed batch (mixup/cutmix), else None


def build_mixup(cfg: AugmentConfig, num_classes: int, label_smoothing: float) -> Mixup | None:
    """timm's Mixup (batch mode) when ``mixup_alpha`` or ``cutmix_alpha`` is set; it smooths the soft
    labels it makes, so the loss adds no smoothing of its own for mixed batches."""
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                 switch_prob=cfg.mix_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)


class InputTransform:
    """uint8 batch on the device -> (SFRN input, AIN input). ``lowpass``: the grid size of a low-pass view of
    the SFRN's input stacked after the spectrum's channels (``lowpass_view``); None: the spectrum alone."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment_cfg: AugmentConfig,
                 normalisation: str, backend: str, with_spectra: bool, seed: int = 0, channels_last: bool = False,
                 device: torch.device | str = "cpu", mixup: Mixup | None = None, lowpass: int | None = None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255.0
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.augment_cfg = augment_cfg
        self.normalisation, self.backend, self.with_spectra = normalisation, backend, with_spectra
        # on the device the batches are on: augmentation draws its numbers there, never copies them
        self.generator = torch.Generator(device).manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mixup = mixup
        self.lowpass = lowpass

    def __call__(self, images_uint8: torch.Tensor, train: bool, labels: torch.Tensor | None = None) -> ModelInputs:
        """``labels``: with mixup/cutmix on, a training batch is mixed (after augmentation, before the
        spectrum) and its soft labels returned as ``targets``."""
        pixels = images_uint8.float()
        targets = None
        if train:
            pixels = augment(pixels, self.augment_cfg, self.generator)
            if self.mixup is not None and labels is not None:
                pixels, targets = self.mixup(pixels, labels)
        spectra = spectrum(pixels, self.normalisation, self.backend) if self.with_spectra else None
        if pixels.device not in self._on_device:  # copied once, not every batch
            self._on_device[pixels.device] = (self.mean.to(pixels.device), self.std.to(pixels.device))
        mean, std = self._on_device[pixels.device]
        images = (pixels - mean) / std
        if spectra is not None and self.lowpass is not None:
            spectra = torch.cat([spectra, lowpass_view(images, self.lowpass)], dim=1)
        images = images.contiguous(memory_format=self.memory_format)
        return ModelInputs(images, None if spectra is None else spectra.contiguous(memory_format=self.memory_format),
                           targets)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
