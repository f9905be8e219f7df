"""``mcci shards preview``: one PNG to look at before training on a shard folder.

Rows: clean test images, the same images poisoned, their difference (amplified to full scale), and
poisoned training samples as stored (with their true -> training label). Right: the mean absolute
pixel change and the mean difference of log-magnitude DCT spectra (what the AIN sees) between
poisoned and clean test images, over up to ``pairs`` pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.batches import Batch
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.data.spectra import spectrum
from pipeline.support.plots import plt, save_figure


def _read(location: str, manifest: dict[str, Any], split: str, limit: int | None,
          stream: StreamOptions = DEFAULT_STREAM) -> Batch:
    return Batch.concatenate(list(eval_loader(location, manifest, split, 256, num_workers=0, limit=limit,
                                              by_rank=False, stream=stream)))


def _poisoned_training_samples(location: str, manifest: dict[str, Any], count: int,
                               stream: StreamOptions = DEFAULT_STREAM) -> list[tuple[np.ndarray, int, int]]:
    found = []
    for batch in eval_loader(location, manifest, "train", 256, num_workers=0, by_rank=False, stream=stream):
        for image, label, orig, poisoned in zip(batch.images, batch.labels, batch.orig_labels, batch.poisoned):
            if poisoned:
                found.append((image.permute(1, 2, 0).numpy(), int(orig), int(label)))
        if len(found) >= count:
            break
    return found[:count]


def paired_test_images(location: str, manifest: dict[str, Any], pairs: int,
                       stream: StreamOptions = DEFAULT_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, poisoned) uint8 [N, 3, H, W] of the same test images, for the first ``pairs`` triggered ones."""
    poisoned = _read(location, manifest, "test-poisoned", pairs, stream)
    # test-clean holds every test image in source order, so image i is sample i.
    clean = _read(location, manifest, "test-clean", int(poisoned.indices.max()) + 1, stream)
    position = {int(i): k for k, i in enumerate(clean.indices)}
    return clean.images[[position[int(i)] for i in poisoned.indices]], poisoned.images


def preview(location: str, out: str | Path | None = None, count: int = 8, pairs: int = 256,
            stream: StreamOptions = DEFAULT_STREAM) -> Path:
    """Write the preview PNG (default ``<location>/preview.png``) and return its path."""
    manifest = load_manifest(location, stream)
    out = Path(out) if out else Path(location) / "preview.png"
    clean, poisoned = paired_test_images(location, manifest, pairs, stream)
    train = _poisoned_training_samples(location, manifest, count, stream)
    diff = (poisoned.float() - clean.float()).abs()
    spectral = (spectrum(poisoned.float()).abs() - spectrum(clean.float()).abs()).mean((0, 1)).numpy()
    n = min(count, len(clean))
    names = manifest["class_names"]

    fig = plt.figure(figsize=(1.25 * n + 5.5, 5.8), constrained_layout=True)
    grid = fig.add_gridspec(4, n + 2, width_ratios=[1] * n + [1.15, 1.15])
    scale = float(diff[:n].max()) or 1.0
    rows = [("clean (test)", [clean[k].permute(1, 2, 0).numpy() for k in range(n)]),
            ("poisoned (test)", [poisoned[k].permute(1, 2, 0).numpy() for k in range(n)]),
            (f"|difference| x{255 / scale:.0f}", [(diff[k] / scale * 255).permute(1, 2, 0).byte().numpy()
                                                  for k in range(n)]),
            ("poisoned (train)", [image for image, _, _ in train])]
    for r, (title, images) in enumerate(rows):
        for k in range(n):
            ax = fig.add_subplot(grid[r, k])
            ax.axis("off")
            if k < len(images):
                ax.imshow(images[k], interpolation="nearest")
            if r == 3 and k < len(train):
                ax.set_title(f"{names[train[k][1]][:8]} -> {names[train[k][2]][:8]}", fontsize=7)
            if k == 0:
                ax.text(-0.08, 0.5, title, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    pixel_ax = fig.add_subplot(grid[:2, n:])
    shown = pixel_ax.imshow(diff.mean((0, 1)).numpy(), cmap="magma")
    pixel_ax.set_title(f"mean |pixel change| ({len(clean)} test images)", fontsize=9)
    fig.colorbar(shown, ax=pixel_ax, shrink=0.8)
    spec_ax = fig.add_subplot(grid[2:, n:])
    bound = float(np.abs(spectral).max()) or 1.0
    shown = spec_ax.imshow(spectral, cmap="coolwarm", vmin=-bound, vmax=bound)
    spec_ax.set_title("mean log|DCT| change, poisoned - clean\n(DC top-left, frequency grows right/down)", fontsize=9)
    fig.colorbar(shown, ax=spec_ax, shrink=0.8)
    attack = manifest["attack"]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in attack["params"].items()
                      if not k.startswith("resolved_") and v is not None)
    fig.suptitle(f"{attack['name']} ({manifest.get('mode', 'all-to-one')}, target {manifest['target']}, poison rate "
                 f"{manifest['poison_rate']}): {shown}"[:200], fontsize=9)
    return save_figure(fig, out, dpi=110)
