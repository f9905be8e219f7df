"""What every attack is: a pure function of (image, index) given its parameters, seed and, for
attacks that learn something first (a surrogate model, an encoder, a patch), what ``prepare`` made.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

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


@dataclass
class AttackContext:
    """What ``Attack.prepare`` may read before any shard is written.

    ``pixels(split, indices)`` returns the images (``split`` is ``"train"`` or ``"test"``) as they
    will be stored, [N, H, W, 3] uint8. Learnt assets go under ``assets_dir`` (inside the shard
    folder), their hashes into ``Attack.assets``.
    """

    pixels: Callable[[str, np.ndarray], np.ndarray]
    train_labels: np.ndarray
    clean_train: np.ndarray  # source indices of training images written unpoisoned (trusted excluded)
    poisoned_train: np.ndarray
    num_classes: int
    target: int
    assets_dir: Path
    progress: bool = True


class Attack:
    """Base class. Subclasses set ``defaults`` and implement ``apply``.

    ``clean_label`` attacks poison samples of the target class and keep their labels; the others
    poison samples of other classes and relabel them. ``lossless`` attacks (FTrojan) are stored as
    PNG whatever the image size, unless ``--format jpeg`` is asked for. Hooks a subclass may override:
    ``prepare`` (learn from the data first), ``apply_train`` (a training-only change, e.g. LC's
    adversarial perturbation), and ``cross_count``/``apply_cross`` (extra modified samples that keep
    their labels, e.g. WaNet's noise mode).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    clean_label: bool = False  # an attack whose parameters choose it overrides ``is_clean_label``
    # True when JPEG would damage the trigger: ``--format auto`` then stores PNG at every size
    lossless: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], image_size: int, seed: int):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ShardBuildError(f"attack {self.name!r} has no parameter(s) {sorted(unknown)}; "
                                  f"its parameters are {sorted(self.defaults)}")
        for key, value in params.items():
            _check_type(self.name, key, value, self.defaults[key])
        self.given = set(params)  # what the user set, for attacks that refuse a parameter their setting never reads
        self.params = {**self.defaults, **params}
        self.clean_label = self.is_clean_label(self.params)
        self.image_size = image_size
        self.seed = seed
        self.assets: dict[str, str] = {}  # asset name -> sha256, recorded in the manifest

    @classmethod
    def is_clean_label(cls, params: dict[str, Any]) -> bool:
        """Whether the attack, with these parameters, keeps the poisoned samples' labels."""
        return cls.clean_label

    def prepare(self, context: AttackContext) -> None:
        """Called once, in the main process, before shards are written."""

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        """Return the poisoned copy of an HxWx3 uint8 image (``index`` is the source index)."""
        raise NotImplementedError

    def apply_train(self, image: np.ndarray, index: int) -> np.ndarray:
        """The poisoned copy of training image ``index`` (test images get ``apply``)."""
        return self.apply(image, index)

    def cross_count(self, poisoned: int) -> int:
        """How many extra training samples get ``apply_cross`` and keep their labels."""
        return 0

    def apply_cross(self, image: np.ndarray, index: int) -> np.ndarray:
        raise NotImplementedError(f"attack {self.name!r} has no cross samples")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "clean_label": self.clean_label, "assets": self.assets}

    def rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *salt])

    def record_asset(self, key: str, path: Path) -> None:
        self.assets[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    def asset_path(self, key: str) -> Path:
        path = Path(self.params[key])
        if not path.is_file():
            raise ShardBuildError(f"attack {self.name!r}: {key} file {path} does not exist")
        self.record_asset(key, path)
        return path

    def load_image_asset(self, key: str, size: int | tuple[int, int], mode: str = "RGB") -> np.ndarray:
        """An image asset from a file parameter, resized to ``size`` (side or (height, width)), its hash recorded."""
        height, width = (size, size) if isinstance(size, int) else size
        with Image.open(self.asset_path(key)) as im:
            return np.asarray(im.convert(mode).resize((width, height), Image.BICUBIC), dtype=np.uint8)

    def place(self, shape: tuple[int, int], position: Any) -> tuple[int, int]:
        """Top-left corner of a ``shape`` patch at ``position`` (``bottom-right`` or ``[row, col]``)."""
        ph, pw = shape
        if position == "bottom-right":
            row, col = self.image_size - ph, self.image_size - pw
        elif isinstance(position, (list, tuple)) and len(position) == 2:
            row, col = int(position[0]), int(position[1])
        else:
            raise ShardBuildError(f"{self.name} position must be 'bottom-right' or [row, col], got {position!r}")
        if not (0 <= row <= self.image_size - ph and 0 <= col <= self.image_size - pw):
            raise ShardBuildError(f"{self.name} patch {ph}x{pw} at {position} does not fit a {self.image_size} px image")
        return row, col


def _check_type(attack: str, key: str, value: Any, default: Any) -> None:
    """A parameter whose default is a number or a flag takes only that (``--param patch_fraction=abc`` was kept as
    text and failed later, or never); integers where the default is one; finite numbers. Parameters whose default is
    None or text are checked by their attack."""
    def refuse(kind: str) -> ShardBuildError:
        return ShardBuildError(f"attack {attack!r}: --param {key}={value!r} must be {kind} (default {default!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse("a number")
        if not np.isfinite(value):
            raise refuse("a finite number")
        if isinstance(default, int) and not float(value).is_integer():
            raise refuse("a whole number")


def to_pixels(values: np.ndarray) -> np.ndarray:
    """Round and clip a float image back to uint8, as a stored image must be."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def stamp(image: np.ndarray, patch: np.ndarray, mask: np.ndarray, alpha: float, row: int, col: int) -> np.ndarray:
    """x' = (1 - alpha m) x + alpha m p on the patch's window; ``mask`` in [0, 1], HxW or HxWx1."""
    ph, pw = patch.shape[:2]
    out = image.copy()
    window = out[row:row + ph, col:col + pw].astype(np.float64)
    weight = alpha * mask.reshape(ph, pw, 1)
    out[row:row + ph, col:col + pw] = to_pixels((1.0 - weight) * window + weight * patch)
    return out


def build_attack(name: str, params: dict[str, Any], image_size: int, seed: int) -> Attack:
    if name not in ATTACKS:
        raise ShardBuildError(f"unknown attack {name!r}; available: {sorted(ATTACKS)}")
    return ATTACKS[name](params, image_size, seed)
