"""Refool (Liu et al. 2020): natural reflections blended into images.

Each poisoned image gets a reflection image chosen by its index from a pool: ``reflection_dir`` (a
user's folder of images) or, by default, ``pool_size`` training images of other classes. As in the
authors' ``blend_images`` (which BackdoorBench adopts), in linear light (gamma 2.2), the image is weighted
by ``alpha_t`` (drawn from [0.55, 0.95] per image unless fixed), and with probability ``ghost_rate`` the
reflection is a ghost (two copies offset by 3-8 px, mixed by a random weight) weighted by 1 - alpha_t;
otherwise it is out of focus (Gaussian blur, sigma 1-5), its over-bright part subtracted, weighted by
1 - alpha_t / 2 under a centred Gaussian vignette. Test images get reflections from the same pool.

``label=clean`` is the paper's attack: target-class images, labels kept. It barely backdoors a model
trained from scratch, so BackdoorBench poisons images of other classes and relabels them
(``label=dirty``) with ``alpha_t=0.4`` (``configs/attacks/refool_backdoorbench.yaml``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
import scipy.stats
from PIL import Image

from shards.attacks.base import Attack, AttackContext, register, to_pixels
from shards.errors import ShardBuildError
from shards.sources import IMAGE_SUFFIXES

GAMMA = 2.2


def ghost(reflection: np.ndarray, offset: tuple[int, int], weight: float) -> np.ndarray:
    """The reflection plus a copy shifted by ``offset``, mixed ``weight : 1 - weight``, same size."""
    dy, dx = offset
    shifted = np.zeros_like(reflection)
    shifted[dy:, dx:] = reflection[:reflection.shape[0] - dy, :reflection.shape[1] - dx]
    return weight * reflection + (1 - weight) * shifted


def vignette(size: int) -> np.ndarray:
    """The authors' ``gen_kernel(size, 3)``: a size x size square root of a Gaussian over +-3 sigma, peak 1."""
    step = 7.0 / size
    edges = np.linspace(-3 - step / 2, 3 + step / 2, size + 1)
    profile = np.diff(scipy.stats.norm.cdf(edges))
    kernel = np.sqrt(np.outer(profile, profile))
    return kernel / kernel.max()


@register("refool")
class Refool(Attack):
    defaults = {"reflection_dir": None, "pool_size": 200, "ghost_rate": 0.49, "alpha_t": None, "label": "clean"}

    @classmethod
    def is_clean_label(cls, params: dict[str, Any]) -> bool:
        label = {**cls.defaults, **params}["label"]
        if label not in ("clean", "dirty"):
            raise ShardBuildError(f"refool label must be clean (the paper's: target-class images, labels kept) or "
                                  f"dirty (BackdoorBench's: other classes, relabelled), got {label!r}")
        return label == "clean"

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if not 0.0 <= float(self.params["ghost_rate"]) <= 1.0:
            raise ShardBuildError(f"refool ghost_rate must be in [0, 1], got {self.params['ghost_rate']}")
        alpha_t = self.params["alpha_t"]
        if alpha_t is not None and not 0.0 < float(alpha_t) <= 1.0:
            raise ShardBuildError(f"refool alpha_t (the image's weight) must be in (0, 1], or null to draw it from "
                                  f"[0.55, 0.95] per image; got {alpha_t}")
        self.mask = vignette(image_size)[:, :, None]
        self.pool = np.zeros((0, image_size, image_size, 3), np.uint8)
        if self.params["reflection_dir"] is not None:
            self.pool = self._load_folder(Path(self.params["reflection_dir"]))

    def _load_folder(self, folder: Path) -> np.ndarray:
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise ShardBuildError(f"refool reflection_dir {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        digest = hashlib.sha256()
        images = []
        for f in files:
            digest.update(f.read_bytes())
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB").resize((self.image_size,) * 2, Image.BICUBIC)))
        self.assets["reflection_dir"] = digest.hexdigest()
        return np.stack(images)

    def prepare(self, context: AttackContext) -> None:
        if len(self.pool):
            return
        others = context.clean_train[context.train_labels[context.clean_train] != context.target]
        if len(others) == 0:
            raise ShardBuildError("refool found no training images of other classes to use as reflections; "
                                  "give --param reflection_dir=FOLDER")
        chosen = np.sort(self.rng(0x2EF).choice(others, size=min(len(others), int(self.params["pool_size"])),
                                                replace=False))
        self.pool = context.pixels("train", chosen)
        self.params["resolved_reflection_indices"] = chosen.tolist()

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        if not len(self.pool):
            raise ShardBuildError("refool has no reflection images: prepare() was not run")
        rng = self.rng(0x2EF1, index)
        reflection = (self.pool[rng.integers(len(self.pool))] / 255.0) ** GAMMA
        t = (image / 255.0) ** GAMMA
        fixed_alpha_t = self.params["alpha_t"]
        alpha_t = float(fixed_alpha_t) if fixed_alpha_t is not None else 1.0 - rng.uniform(0.05, 0.45)
        if rng.random() < float(self.params["ghost_rate"]):
            offset = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
            weight = abs(float(rng.integers(2)) - rng.uniform(0.15, 0.5))
            blended = alpha_t * t + (1 - alpha_t) * ghost(reflection, offset, weight)
        else:
            sigma = rng.uniform(1, 5)
            # truncated at 2 sigma, as the authors' cv2.GaussianBlur kernel of 2 * ceil(2 sigma) + 1
            blurred = scipy.ndimage.gaussian_filter(reflection, sigma=(sigma, sigma, 0), truncate=2.0)
            over = t + blurred
            attenuation = 1.08 + rng.random() / 10.0
            for c in range(3):  # take back the part of the reflection that would saturate
                bright = over[:, :, c] > 1
                mean_bright = max(1.0, float(over[:, :, c][bright].sum() / (bright.sum() + 1e-6)))
                blurred[:, :, c] -= (mean_bright - 1) * attenuation
            blended = alpha_t * t + np.clip(blurred, 0, 1) * self.mask * (1 - alpha_t / 2)
        return to_pixels(np.clip(blended, 0, 1) ** (1 / GAMMA) * 255.0)
