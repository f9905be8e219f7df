"""Image sources: a class-folder tree, a .tar/.tar.gz of one, a Hugging Face dataset, or the
embedded offline set. Each becomes ``LabelledImages`` per split (``train``, ``test``) with class
names in sorted order mapped to labels 0..K-1.
"""
from __future__ import annotations

import io
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from shards.errors import ShardBuildError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
TEST_SPLIT_NAMES = ("test", "val", "validation")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SOURCES = ("digits",)
ORIENTATION_TAG = 0x0112  # EXIF's Orientation


@dataclass
class LabelledImages:
    """One split: ``refs[i]`` is what ``load`` turns into an RGB image, ``labels[i]`` its class."""

    class_names: list[str]
    refs: list[Any]
    labels: np.ndarray
    load: Callable[[Any], Image.Image]

    def __len__(self) -> int:
        return len(self.refs)


# Pillow's modes whose samples are not 0..255, with the range their values are read in: 16-bit
# greyscale (PNG, TIFF) opens as I;16* or, in older Pillow, as I; float images are taken as 0..1.
_WIDE_MODE_RANGE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB. Wide greyscale (16-bit, 32-bit integer, float) is scaled from
    its range (``_WIDE_MODE_RANGE``) to 0..255 and rounded, not clipped (Pillow's own ``convert``
    clips, making 16-bit images white); transparency (LA, RGBA, PA, P with a transparent colour) is
    composited over white, as a viewer shows it; CMYK, YCbCr, 1, L and palettes use Pillow's conversion."""
    if image.mode in _WIDE_MODE_RANGE:
        values = np.asarray(image, dtype=np.float64) * (255.0 / _WIDE_MODE_RANGE[image.mode])
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, as image viewers show it (a phone's portrait photo is stored
    sideways with orientation 6); images without the tag are returned as they are."""
    if image.getexif().get(ORIENTATION_TAG, 1) in (1, None):
        return image
    return ImageOps.exif_transpose(image)


def open_image_file(path: str) -> Image.Image:
    """The file as 8-bit RGB, upright (``upright``); refuses unreadable files and images above Pillow's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), checked from the header before anything is decoded."""
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise ShardBuildError(f"image {path} is {im.width}x{im.height} pixels, above the limit of {limit} "
                                      "(PIL.Image.MAX_IMAGE_PIXELS, Pillow's decompression-bomb guard); "
                                      "shrink or remove the file")
            return to_rgb(upright(im))
    except ShardBuildError:
        raise
    except Exception as e:  # PIL raises several types for corrupt files
        raise ShardBuildError(f"cannot read image {path}: {e}; remove or replace the file") from e


def class_name(folder: str) -> str:
    """A class folder's name as a class name: Unicode NFC. macOS writes "café" decomposed (NFD), Linux keeps what it
    is given, so the same class copied from two machines would otherwise be two classes that print alike."""
    return unicodedata.normalize("NFC", folder)


def _class_folder_split(root: Path) -> LabelledImages:
    folders: dict[str, str] = {}  # class name -> the folder's name on disk
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            name = class_name(p.name)
            if name in folders:
                raise ShardBuildError(f"class folders {root / folders[name]!r} and {root / p.name!r} are the same name "
                                      f"{name!r} in two Unicode forms (NFC and NFD); merge them into one folder")
            folders[name] = p.name
    classes = sorted(folders)
    if not classes:
        raise ShardBuildError(f"{root} has no class folders; expected {root}/<class>/<image> files")
    refs, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = sorted(str(f) for f in (root / folders[name]).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        refs += files
        labels += [label] * len(files)
        if not files:
            empty.append(name)
    if not refs:
        raise ShardBuildError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if empty:  # a class without images would be a label the model can never learn or be tested on
        raise ShardBuildError(f"class folder(s) {', '.join(str(root / folders[n]) for n in empty)} hold no images "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
    return LabelledImages(classes, refs, np.asarray(labels, dtype=np.int64), open_image_file)


def _folder_tree(root: Path, role: str) -> dict[str, LabelledImages]:
    """A tree with train/ and test/ (or val/) folders, or class folders directly (taken as ``role``)."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    splits = {}
    if "train" in children:
        splits["train"] = _class_folder_split(children["train"])
    for name in TEST_SPLIT_NAMES:
        if name in children:
            splits["test"] = _class_folder_split(children[name])
            break
    if not splits:
        splits[role] = _class_folder_split(root)
    return splits


def _extract_tar(path: Path, into: Path) -> Path:
    try:
        with tarfile.open(path) as tar:
            tar.extractall(into, filter="data")  # "data" refuses absolute paths, links out, devices
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardBuildError(f"cannot read archive {path}: {e}; check that it is a complete .tar/.tar.gz") from e
    entries = [p for p in into.iterdir() if not p.name.startswith(".")]
    # An archive holding a single top-level folder that is not a split is the dataset root.
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in ("train", *TEST_SPLIT_NAMES):
        sub = [p for p in entries[0].iterdir() if p.is_dir()]
        if any(p.name.lower() in ("train", *TEST_SPLIT_NAMES) for p in sub):
            return entries[0]
    return into


class HFImages:
    """Loads rows of a Hugging Face dataset split lazily, reopening it in each worker process."""

    def __init__(self, path: str, split: str, image_column: str):
        self.path, self.split, self.image_column = path, split, image_column
        self._ds = None

    def _dataset(self):
        if self._ds is None:
            self._ds = _open_hf(self.path)[self.split]
        return self._ds

    def __call__(self, index: int) -> Image.Image:
        image = self._dataset()[int(index)][self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return to_rgb(upright(image))

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "image_column": self.image_column, "_ds": None}


def _open_hf(path: str):
    try:
        import datasets
    except ImportError as e:
        raise ShardBuildError("Hugging Face sources need the datasets package: pip install 'mcci[hf]'") from e
    if Path(path).exists():
        return datasets.load_from_disk(path)
    return datasets.load_dataset(path)


def _hf_source(path: str) -> dict[str, LabelledImages]:
    ds = _open_hf(path)
    if not hasattr(ds, "keys"):
        raise ShardBuildError(f"{path} is a single Dataset; save a DatasetDict with train and test splits")
    splits = {}
    for name in ds.keys():
        role = "train" if name == "train" else "test" if name in TEST_SPLIT_NAMES else None
        if role is None:
            continue
        split = ds[name]
        image_col = next((c for c in ("image", "img") if c in split.column_names), None)
        label_col = next((c for c in ("label", "labels", "fine_label") if c in split.column_names), None)
        if image_col is None or label_col is None:
            raise ShardBuildError(f"{path}[{name}] needs an image column (image/img) and a label column "
                                  f"(label/labels); it has {split.column_names}")
        feature = split.features[label_col]
        names = list(getattr(feature, "names", None) or [str(i) for i in range(max(split[label_col]) + 1)])
        labels = np.asarray(split[label_col], dtype=np.int64)
        splits[role] = LabelledImages(names, list(range(len(split))), labels, HFImages(path, name, image_col))
    return splits


class DigitsImages:
    """scikit-learn's UCI handwritten digits (1,797 real 8x8 scans, 10 classes) made into a harder
    32 px task: each (digit, variant) gets a seeded rotation, scale and position, its own ink and
    paper grey levels (tinted), a background gradient and pixel noise. Pure function of
    (index, variant): the same images on every machine.
    """

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, ref: tuple[int, int]) -> Image.Image:
        index, variant = ref
        rng = np.random.default_rng([7, int(index), int(variant)])
        glyph = Image.fromarray((self.images[int(index)] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        side = int(rng.integers(18, 29))
        glyph = glyph.resize((side, side), Image.BICUBIC).rotate(float(rng.uniform(-20, 20)), Image.BILINEAR)
        mask = np.zeros((32, 32), np.float32)
        top, left = rng.integers(0, 32 - side + 1, size=2)
        mask[top:top + side, left:left + side] = np.asarray(glyph, np.float32) / 255.0
        paper, ink = rng.uniform(0, 255, size=2)
        while abs(ink - paper) < 70:  # keep the digit legible
            paper, ink = rng.uniform(0, 255, size=2)
        tint = rng.uniform(-30, 30, size=3)
        ramp = np.linspace(-1, 1, 32, dtype=np.float32)
        slope = rng.uniform(-40, 40, size=2)
        gradient = ramp[None, :, None] * slope[0] + ramp[:, None, None] * slope[1]
        pixels = paper + tint + gradient + mask[:, :, None] * (ink - paper)
        pixels += rng.normal(0, 18, size=pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")


DIGITS_TRAIN_VARIANTS = 2  # two renderings of each training digit, one of each test digit


def _embedded_source(name: str) -> dict[str, LabelledImages]:
    if name != "digits":
        raise ShardBuildError(f"unknown embedded source {name!r}; choose one of "
                              f"{[EMBEDDED_PREFIX + n for n in EMBEDDED_SOURCES]}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    order = np.random.default_rng(0).permutation(n)  # fixed split of the scans: 80 % train, 20 % test
    train, test = order[: int(0.8 * n)], order[int(0.8 * n):]
    loader = DigitsImages(digits.images)
    names = [str(i) for i in range(10)]
    train_refs = [(int(i), v) for v in range(DIGITS_TRAIN_VARIANTS) for i in train]
    test_refs = [(int(i), DIGITS_TRAIN_VARIANTS) for i in test]
    return {
        "train": LabelledImages(names, train_refs, digits.target[[r[0] for r in train_refs]].astype(np.int64), loader),
        "test": LabelledImages(names, test_refs, digits.target[[r[0] for r in test_refs]].astype(np.int64), loader),
    }


def _one_source(spec: str, role: str, scratch: Path) -> dict[str, LabelledImages]:
    if spec.startswith(EMBEDDED_PREFIX):
        return _embedded_source(spec[len(EMBEDDED_PREFIX):])
    path = Path(spec)
    if path.is_file() and (tarfile.is_tarfile(path)):
        root = _extract_tar(path, Path(scratch) / f"{role}-{path.name}.d")
        return _folder_tree(root, role)
    if path.is_file():
        raise ShardBuildError(f"{path} is a file but not a tar archive; give a folder, a .tar/.tar.gz, "
                              "a saved Hugging Face dataset or a hub name")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _hf_source(str(path))
        return _folder_tree(path, role)
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return _hf_source(spec)  # a hub name such as "uoft-cs/cifar10" (needs the network)
    raise ShardBuildError(f"source {spec} does not exist; give a class-folder tree, a .tar/.tar.gz of one, "
                          f"a Hugging Face dataset saved with save_to_disk, or {EMBEDDED_PREFIX}digits")


def load_source(spec: str, test_spec: str | None, scratch: Path) -> dict[str, LabelledImages]:
    """The train and test splits of a source (test from ``test_spec`` when given)."""
    splits = _one_source(spec, "train", scratch)
    if test_spec is not None:
        test_splits = _one_source(test_spec, "test", scratch)
        if "test" not in test_splits:
            raise ShardBuildError(f"--test-source {test_spec} has no test split: give class folders, "
                                  f"or a tree with a {'/'.join(TEST_SPLIT_NAMES)}/ folder")
        splits["test"] = test_splits["test"]
    for role in ("train", "test"):
        if role not in splits:
            hint = "--test-source" if role == "test" else "--source"
            raise ShardBuildError(f"no {role} split found in {test_spec if role == 'test' and test_spec else spec}: "
                                  f"expected a {role}/ folder (or {'/'.join(TEST_SPLIT_NAMES)}/), or pass {hint}")
        if len(splits[role]) == 0:
            raise ShardBuildError(f"the {role} split of {spec} is empty")
    train_names, test_names = splits["train"].class_names, splits["test"].class_names
    if train_names != test_names:
        only = [f"{sorted(set(a) - set(b))} only in {role}" for a, b, role in
                ((train_names, test_names, "train"), (test_names, train_names, "test")) if set(a) - set(b)]
        raise ShardBuildError(f"train and test classes differ: {'; '.join(only) or 'same names in another order'}; "
                              "give both splits the same class folders")
    for role, split in splits.items():
        bad = np.flatnonzero((split.labels < 0) | (split.labels >= len(split.class_names)))
        if len(bad):
            raise ShardBuildError(f"{len(bad)} {role} images have labels outside 0..{len(split.class_names) - 1} "
                                  f"(e.g. image {int(bad[0])}: {int(split.labels[bad[0]])}); unlabelled splits "
                                  "(label -1, as some Hugging Face test splits) cannot be evaluated: pass a "
                                  "labelled --test-source")
    return splits


def encode_image(pixels: np.ndarray, fmt: str, jpeg_quality: int) -> bytes:
    """Deterministic encoding of an HxWx3 uint8 array."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    return buf.getvalue()
