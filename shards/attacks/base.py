"""What every attack is: a pure function of (image, index) given its parameters and seed."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from shards.errors import ShardBuildError

ATTACKS: dict[str, type["Attack"]] = {}


def register(name: str):
    def wrap(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        ATTACKS[name] = cls
        return cls
    return wrap


class Attack:
    """Base class. Subclasses set ``defaults`` and implement ``apply``.

    ``clean_label`` attacks poison samples of the target class and keep their labels; the others
    poison samples of other classes and relabel them to the target.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    clean_label: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], image_size: int, seed: int):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ShardBuildError(f"attack {self.name!r} has no parameter(s) {sorted(unknown)}; "
                                  f"its parameters are {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.image_size = image_size
        self.seed = seed
        self.assets: dict[str, str] = {}  # asset name -> sha256, recorded in the manifest

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        """Return the poisoned copy of an HxWx3 uint8 image (``index`` is the source index)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "clean_label": self.clean_label, "assets": self.assets}

    def rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *salt])

    def load_image_asset(self, key: str, size: int) -> np.ndarray:
        """An RGB asset from a file parameter, resized to ``size``, its hash recorded."""
        path = Path(self.params[key])
        if not path.is_file():
            raise ShardBuildError(f"attack {self.name!r}: {key} file {path} does not exist")
        self.assets[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def to_pixels(values: np.ndarray) -> np.ndarray:
    """Round and clip a float image back to uint8, as a stored image must be."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def build_attack(name: str, params: dict[str, Any], image_size: int, seed: int) -> Attack:
    if name not in ATTACKS:
        raise ShardBuildError(f"unknown attack {name!r}; available: {sorted(ATTACKS)}")
    return ATTACKS[name](params, image_size, seed)
