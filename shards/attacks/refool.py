"""Refool (Liu et al. 2020): natural reflections blended into target-class images (clean label).

Each poisoned image gets a reflection image chosen by its index from a pool: ``reflection_dir`` (a
user's folder of images) or, by default, ``pool_size`` training images of other classes. As in
BackdoorBench's ``blend_images``, in linear light (gamma 2.2), with probability ``ghost_rate`` the
reflection is a ghost (two copies offset by 3-8 px, mixed by a random weight) weighted by
1 - alpha_t with alpha_t in [0.55, 0.95]; otherwise it is out of focus (Gaussian blur, sigma 1-5),
its over-bright part subtracted, and added to the image. BackdoorBench's vignette mask and random
crop of the reflection are left out. Test images get reflections from the same pool.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import scipy.ndimage
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


@register("refool")
class Refool(Attack):
    defaults = {"reflection_dir": None, "pool_size": 200, "ghost_rate": 0.49}
    clean_label = True

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if not 0.0 <= float(self.params["ghost_rate"]) <= 1.0:
            raise ShardBuildError(f"refool ghost_rate must be in [0, 1], got {self.params['ghost_rate']}")
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
        if rng.random() < float(self.params["ghost_rate"]):
            offset = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
            weight = abs(float(rng.integers(2)) - rng.uniform(0.15, 0.5))
            alpha_t = 1.0 - rng.uniform(0.05, 0.45)
            blended = alpha_t * t + (1 - alpha_t) * ghost(reflection, offset, weight)
        else:
            sigma = rng.uniform(1, 5)
            blurred = scipy.ndimage.gaussian_filter(reflection, sigma=(sigma, sigma, 0))
            over = t + blurred
            attenuation = 1.08 + rng.random() / 10.0
            for c in range(3):  # take back the part of the reflection that would saturate
                bright = over[:, :, c] > 1
                mean_bright = max(1.0, float(over[:, :, c][bright].sum() / (bright.sum() + 1e-6)))
                blurred[:, :, c] -= (mean_bright - 1) * attenuation
            blended = t + np.clip(blurred, 0, 1)
        return to_pixels(np.clip(blended, 0, 1) ** (1 / GAMMA) * 255.0)
