"""Evaluation: the mind-control reference, and CA / ASR / RA for each inference mode.

Modes: ``plain`` for the undefended baseline; for MCCI ``own`` (each input's own spectrum, the
model as trained) and ``mind_control`` (every input shown to the AIN as clean).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mcci_models import MCCI
from pipeline.data.loaders import eval_loader
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.errors import ShardError
from pipeline.support.metrics import Counts, attack_targets, count_clean, count_triggered

MCCI_MODES = ("own", "mind_control")


@torch.no_grad()
def reference_spectra(location: str, manifest: dict[str, Any], split: str, count: int,
                      transform: InputTransform, device: torch.device, batch_size: int = 256,
                      stream: StreamOptions = DEFAULT_STREAM) -> torch.Tensor:
    """Normalised spectra [N, C, H, W] of the first ``count`` images of a split (no augmentation)."""
    available = manifest["splits"].get(split, {}).get("count", 0)
    if available == 0:
        raise ShardError(f"reference.source={split!r} has no images in {location}; build shards with "
                         "--trusted-count > 0 or set reference.source=train")
    spectra = []
    for batch in eval_loader(location, manifest, split, batch_size, num_workers=0, limit=count, by_rank=False,
                             stream=stream):
        spectra.append(transform(batch.images.to(device), train=False).spectra)
    return torch.cat(spectra)


def set_model_reference(model: MCCI, location: str, manifest: dict[str, Any], kind: str, split: str, count: int,
                        transform: InputTransform, device: torch.device,
                        stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """Compute and store the reference; returns its description for the model's metadata."""
    spectra = reference_spectra(location, manifest, split, count, transform, device, stream=stream)
    model.set_reference(kind, spectra)
    return {"kind": kind, "source": split, "count": int(spectra.shape[0]),
            "shards_manifest_seed": manifest.get("seed"), "attack": manifest["attack"]["name"]}


def _predict(model: nn.Module, inputs, mode: str) -> torch.Tensor:
    if mode == "plain":
        return model(inputs.images).argmax(1)
    if mode == "own":
        return model(inputs.images, inputs.spectra).argmax(1)
    return model(inputs.images).argmax(1)  # mind_control: the model's fixed reference


@torch.no_grad()
def evaluate(model: nn.Module, location: str, manifest: dict[str, Any], transform: InputTransform,
             device: torch.device, batch_size: int, num_workers: int,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             autocast: Callable[[], Any] | None = None, modes: tuple[str, ...] | None = None,
             stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """Metrics per mode (default: every mode of the model). ``reduce`` sums count tensors across
    ranks (identity in one process)."""
    model.eval()
    is_mcci = isinstance(model, MCCI)
    modes = modes or (MCCI_MODES if is_mcci else ("plain",))
    # one row of Counts per mode, summed on the device and read back once at the end
    totals = Counts().as_tensor().repeat(len(modes), 1).to(device)
    # attack_mode, not mode: the loop below names the inference mode
    target, attack_mode, num_classes = int(manifest["target"]), manifest.get("mode", "all-to-one"), manifest["num_classes"]
    ctx = autocast or (lambda: torch.autocast(device.type, enabled=False))
    for split in ("test-clean", "test-poisoned"):
        for batch in eval_loader(location, manifest, split, batch_size, num_workers, stream=stream):
            batch = batch.to(device)
            targets = attack_targets(batch.orig_labels, target, attack_mode, num_classes)
            inputs = transform(batch.images, train=False)
            for row, mode in zip(totals, modes):
                with ctx():
                    pred = _predict(model, inputs, mode)
                if split == "test-clean":
                    row[Counts.CLEAN] += count_clean(pred, batch.orig_labels)
                else:
                    row[Counts.TRIGGERED] += count_triggered(pred, batch.orig_labels, targets)
    results = {m: Counts.from_tensor(row).metrics() for m, row in zip(modes, reduce(totals).cpu())}
    return results if is_mcci else results["plain"]
