"""``mcci predict``: classify image files with a trained model, as it would be deployed.

An MCCI model predicts under mind control: its stored clean reference stands in for every input's
spectrum, so the image alone decides. An undefended baseline predicts plainly. Each image is fitted
to the model's size the way `mcci shards build` fits training images (shorter side resized, centre
crop), so predictions match what `mcci eval` measured.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from mcci_models import MCCI, default_device
from pipeline.components.models import build_transform, load_trained
from pipeline.support.errors import JobError
from shards.build import fit_image
from shards.sources import IMAGE_SUFFIXES, open_image_file

MAX_ENLARGEMENT = 8  # how much predict enlarges an image at most (a 28 px image for a 224 px model)
MIN_SIDE = 2


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted); refuses missing paths."""
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; give image files or folders of them")
    if not files:
        raise JobError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(paths)}")
    return files


def _readable_image(path: Path, size: int) -> Image.Image:
    """The file as the shard builder reads one (upright, RGB), refused when it is so much smaller than the model's
    input that enlarging it would invent what the model classifies (a 1x1 image is one colour at any size)."""
    image = open_image_file(str(path))
    smallest = max(MIN_SIDE, size // MAX_ENLARGEMENT)
    if min(image.size) < smallest:
        raise JobError(f"image {path} is {image.width}x{image.height} px; the model sees {size} px, and an image under "
                       f"{smallest} px per side would be enlarged more than {MAX_ENLARGEMENT}x: give a larger image")
    return image


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def predict(checkpoint: str | Path, paths: list[str], top_k: int = 1, batch_size: int = 64,
            device: str | None = None) -> list[dict[str, Any]]:
    """One record per image: its path and the ``top_k`` classes with their probabilities."""
    dev = torch.device(device) if device else default_device()
    model, cfg, meta = load_trained(checkpoint, dev)
    if isinstance(model, MCCI) and not model.reference_ready:
        raise JobError(f"{checkpoint} has no mind-control reference; use the model folder `mcci train` saved")
    names, size = meta["class_names"], meta["image_size"]
    if not 1 <= top_k <= len(names):
        raise JobError(f"--top-k must be between 1 and the model's {len(names)} classes, got {top_k}")
    transform = build_transform(cfg, spectra=False)  # mind control: no spectrum to compute
    records = []
    for chunk in _chunks(image_files(paths), batch_size):
        pixels = np.stack([fit_image(_readable_image(f, size), size, meta.get("crop_pct", 1.0)) for f in chunk])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(dev)
        probabilities = model(transform(images, train=False).images).float().softmax(1)  # MCCI: mind control
        top = probabilities.topk(top_k, dim=1)
        for path, probs, classes in zip(chunk, top.values.tolist(), top.indices.tolist()):
            records.append({"path": str(path), "predictions": [{"class": c, "name": names[c], "probability": round(p, 5)}
                                                               for p, c in zip(probs, classes)]})
    return records
