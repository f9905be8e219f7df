"""Evaluation: the mind-control reference, and CA / ASR / RA for each inference mode.

Modes: ``plain`` for the undefended baseline; for MCCI ``own`` (each input's own spectrum, the
model as trained) and ``mind_control`` (every input shown to the AIN as clean).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mcci_models import MCCI
from pipeline.data.batches import EncodedBatch
from pipeline.data.loaders import eval_loader
from pipeline.data.prefetch import to_device
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.errors import ShardError
from pipeline.support.metrics import (Counts, attack_targets, class_accuracies, count_clean, count_clean_by_class,
                                      count_triggered)

MCCI_MODES = ("own", "mind_control")


def class_quotas(count: int, num_classes: int) -> list[int]:
    """``count`` split as evenly as it goes over the classes: count // K each, one more for the first count % K."""
    return [count // num_classes + (label < count % num_classes) for label in range(num_classes)]


@torch.no_grad()
def reference_spectra(location: str, manifest: dict[str, Any], split: str, count: int,
                      transform: InputTransform, device: torch.device, batch_size: int = 256,
                      stream: StreamOptions = DEFAULT_STREAM) -> tuple[torch.Tensor, list[int]]:
    """Normalised spectra [N, C, H, W] of ``count`` images of a split (no augmentation), balanced over the classes
    of their labels (``class_quotas``), the first of each class in shard order; and how many of each class were
    taken (fewer where a class has fewer). Shards keep a folder tree's class order, so the first ``count`` would be
    one or two classes. Only the images taken are decoded; the read stops once every quota is met."""
    available = manifest["splits"].get(split, {}).get("count", 0)
    if available == 0:
        raise ShardError(f"reference.source={split!r} has no images in {location}; build shards with "
                         "--trusted-count > 0 or set reference.source=train")
    quotas = class_quotas(count, manifest["num_classes"])
    taken = [0] * len(quotas)
    spectra = []
    for batch in eval_loader(location, manifest, split, batch_size, num_workers=0, by_rank=False, decode="device",
                             stream=stream):
        keep = []
        for row, label in enumerate(batch.labels.tolist()):
            if taken[label] < quotas[label]:
                taken[label] += 1
                keep.append(row)
        if keep:
            chosen = EncodedBatch([batch.encoded[i] for i in keep], batch.image_format,
                                  *(t[keep] for t in batch.fields()))
            spectra.append(transform(to_device(chosen, device).images, train=False).spectra)
        if taken == quotas:
            break
    return torch.cat(spectra), taken


def set_model_reference(model: MCCI, location: str, manifest: dict[str, Any], kind: str, split: str, count: int,
                        transform: InputTransform, device: torch.device,
                        stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """Compute and store the reference; returns its description for the model's metadata (the images used, per
    class, not the count asked for)."""
    spectra, per_class = reference_spectra(location, manifest, split, count, transform, device, stream=stream)
    model.set_reference(kind, spectra)
    return {"kind": kind, "source": split, "count": int(spectra.shape[0]), "per_class": per_class,
            "shards_manifest_seed": manifest.get("seed"), "attack": manifest["attack"]["name"]}


def _predictions(model: nn.Module, inputs, modes: tuple[str, ...], diagnose: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Each mode's predicted classes, and for ``diagnose`` the MCCI features they came from. MCCI's SFRN runs once
    for all its modes, its AIN once (for ``own``, or the diagnostics)."""
    if not isinstance(model, MCCI):
        return {"plain": model(inputs.images).argmax(1)}, None
    sfrn_features = model.sfrn(inputs.images)
    ain_features = model.ain(inputs.spectra) if "own" in modes or diagnose else None
    preds = {"mind_control": model.fuse(sfrn_features, model.mind_control_features(len(sfrn_features))).argmax(1)}
    if ain_features is not None:
        preds["own"] = model.fuse(sfrn_features, ain_features).argmax(1)
    return preds, (sfrn_features, ain_features) if diagnose else None


# evaluate(..., parts=...) on MCCI: where each half of the head puts a triggered input (means over test-poisoned,
# true label != target). A margin is a logit less another of the same half: "target" is target - true label;
# "true" is the true label less the best other class.
PART_FIGURES = ("sfrn_target_margin", "ain_target_margin", "sfrn_true_margin", "sfrn_true_margin_clean",
                "mind_control_other")


def _part_sums(model: MCCI, features: tuple[torch.Tensor, torch.Tensor], mind_control: torch.Tensor,
               orig_labels: torch.Tensor, targets: torch.Tensor, split: str) -> torch.Tensor:
    """Sums behind PART_FIGURES for one batch, and the count they are over, as one float tensor [6]."""
    sfrn, ain = (half.float() for half in model.halves(*features))
    true = orig_labels[:, None]

    def true_margin(logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, true)[:, 0] - logits.scatter(1, true, float("-inf")).max(1).values

    zero = torch.zeros((), device=sfrn.device)
    if split == "test-clean":
        return torch.stack([zero, zero, zero, true_margin(sfrn).sum(), zero, zero])
    keep = (orig_labels != targets).float()
    target = targets[:, None]
    other = ((mind_control != targets) & (mind_control != orig_labels)).float()
    return torch.stack([((sfrn.gather(1, target) - sfrn.gather(1, true))[:, 0] * keep).sum(),
                        ((ain.gather(1, target) - ain.gather(1, true))[:, 0] * keep).sum(),
                        (true_margin(sfrn) * keep).sum(), zero, (other * keep).sum(), keep.sum()])


@torch.no_grad()
def evaluate(model: nn.Module, location: str, manifest: dict[str, Any], transform: InputTransform,
             device: torch.device, batch_size: int, num_workers: int,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             autocast: Callable[[], Any] | None = None, modes: tuple[str, ...] | None = None,
             stream: StreamOptions = DEFAULT_STREAM, parts: dict[str, float] | None = None) -> dict[str, Any]:
    """Metrics per mode (default: every mode of the model). ``reduce`` sums count tensors across
    ranks (identity in one process). ``parts`` (MCCI): a dict filled with PART_FIGURES, how each half of the head
    treats the triggered inputs, for the training log."""
    return evaluate_models({"model": model}, location, manifest, transform, device, batch_size, num_workers, reduce,
                           autocast, modes, stream, None if parts is None else {"model": parts})["model"]


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], location: str, manifest: dict[str, Any], transform: InputTransform,
                    device: torch.device, batch_size: int, num_workers: int,
                    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                    autocast: Callable[[], Any] | None = None, modes: tuple[str, ...] | None = None,
                    stream: StreamOptions = DEFAULT_STREAM,
                    parts: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """``evaluate`` of several models (a run's raw weights and its EMA) in one pass over the test splits: each
    batch is read, decoded and transformed once, and each model scores it in all its modes. Models share the data,
    so their figures are over the same samples. Each mode's figures include ``clean_acc_by_class`` (CA of each
    class's clean test images, by label): an average CA can hide one class given up, as a shifted class prior
    would. ``parts``: a dict per model name to fill (MCCI models)."""
    totals, by_class, part_sums, chosen = {}, {}, {}, {}
    # attack_mode, not mode: the loop below names the inference mode
    target, attack_mode, num_classes = int(manifest["target"]), manifest.get("mode", "all-to-one"), manifest["num_classes"]
    for name, model in models.items():
        model.eval()
        is_mcci = isinstance(model, MCCI)
        chosen[name] = modes or (MCCI_MODES if is_mcci else ("plain",))
        # one row of Counts per mode, summed on the device and read back once at the end
        totals[name] = Counts().as_tensor().repeat(len(chosen[name]), 1).to(device)
        by_class[name] = torch.zeros(len(chosen[name]), 2, num_classes, dtype=torch.long, device=device)
        if parts is not None and name in parts and is_mcci:
            part_sums[name] = torch.zeros(7, device=device)  # PART_FIGURES' sums, the triggered count, the clean one
    ctx = autocast or (lambda: torch.autocast(device.type, enabled=False))
    for split in ("test-clean", "test-poisoned"):
        for batch in eval_loader(location, manifest, split, batch_size, num_workers, stream=stream):
            batch = batch.to(device)
            targets = attack_targets(batch.orig_labels, target, attack_mode, num_classes)
            inputs = transform(batch.images, train=False)
            for name, model in models.items():
                diagnose = name in part_sums
                with ctx():
                    preds, features = _predictions(model, inputs, chosen[name], diagnose)
                    if diagnose:
                        part_sums[name][:6] += _part_sums(model, features, preds["mind_control"], batch.orig_labels,
                                                          targets, split)
                        part_sums[name][6] += len(batch.orig_labels) if split == "test-clean" else 0
                for row, classes, pred in zip(totals[name], by_class[name], (preds[mode] for mode in chosen[name])):
                    if split == "test-clean":
                        row[Counts.CLEAN] += count_clean(pred, batch.orig_labels)
                        classes += count_clean_by_class(pred, batch.orig_labels, num_classes)
                    else:
                        row[Counts.TRIGGERED] += count_triggered(pred, batch.orig_labels, targets)
    results = {}
    for name, model in models.items():
        by_mode = {m: {**Counts.from_tensor(row).metrics(), "clean_acc_by_class": class_accuracies(classes)}
                   for m, row, classes in zip(chosen[name], reduce(totals[name]).cpu(), reduce(by_class[name]).cpu())}
        results[name] = by_mode if isinstance(model, MCCI) else by_mode["plain"]
        if name in part_sums:
            sums = reduce(part_sums[name]).tolist()
            triggered, clean = max(sums[5], 1.0), max(sums[6], 1.0)
            parts[name].update({figure: round(sums[i] / (clean if figure.endswith("_clean") else triggered), 4)
                                for i, figure in enumerate(PART_FIGURES)})
    return results
