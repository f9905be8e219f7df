"""``mcci refit-head``: refit a trained model's last layer on the shards' trusted split, a new model.

MCCI cuts the trigger's path through the AIN, but its SFRN can still learn a trigger that needs no label
conflict to be learnt (LF's universal adversarial pattern, Refool's reflections): mind control then leaves
it. The trusted images never carried a trigger, so a linear readout of the features fitted on them alone
has no reason to map a triggered input to the target (docs/RESULTS.md measures it, and the same refit of
an undefended model's classifier beside it). The refit is of the layer the model predicts with (MCCI: the
SFRN's half of the fusion head under mind control; undefended: its classifier), by logistic regression
with an L2 penalty towards zero (``pipeline/components/head_refit.py``): 0.01 by default, or ``cv`` to choose it
by 5-fold cross-validation on the trusted images (with few of them cross-validation can pick a penalty that
costs clean accuracy; how both did: docs/RESULTS.md, "A trusted head refit").

Never refit on the model's own training split: its poisoned samples teach the refit the trigger that the
trained head ignored (docs/RESULTS.md, "refit on every training sample"); this job reads the trusted split only.

Writes ``<out>/model`` (the model with the new head, in the folder format of ``mcci train``, so eval,
predict, export and audit take it) and ``<out>/refit.json`` (the trusted set, the penalty and its
cross-validated accuracy, the trusted accuracy before and after).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from mcci_models.saved import MODEL_DIR, read_model_description
from pipeline.components.checkpoint import save_model
from pipeline.components.head_refit import (accuracy, choose_weight_decay, fit_head, layer_inputs,
                                            read_head, refit_layer, write_head)
from pipeline.components.models import build_transform, job_device, load_matching_manifest, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.storage import StreamOptions, with_overrides
from pipeline.support.errors import JobError
from pipeline.support.report import write_json

SPLIT = "trusted"
REFIT_FILE = "refit.json"
DEFAULT_WEIGHT_DECAY = 0.01
CROSS_VALIDATE = "cv"


def _check_trusted(manifest: dict[str, Any], shards: str) -> None:
    if manifest["splits"].get(SPLIT, {}).get("count", 0) == 0:
        raise JobError(f"{shards} has no trusted images; build shards with --trusted-count N (clean training images "
                       "held out as the defender's trusted set, default 100) and refit on those")


def _check_every_class(labels: torch.Tensor, meta: dict[str, Any], images: str, fix: str) -> None:
    """A refit on images that lack a class would learn never to predict it."""
    missing = sorted(set(range(meta["num_classes"])) - set(labels.tolist()))
    if missing:
        names = [meta["class_names"][k] for k in missing]
        raise JobError(f"{images} has no image of {len(missing)} class(es) ({', '.join(names[:5])}"
                       f"{', ...' if len(names) > 5 else ''}); a refit on it would learn never to predict them: {fix}")


def refit_head(checkpoint: str | Path, shards: str, out: str | Path, weight_decay: float | str = DEFAULT_WEIGHT_DECAY,
               max_images: int | None = None, batch_size: int = 256, num_workers: int = 2,
               device: str | None = None, timeout: float | None = None,
               retries: int | None = None) -> dict[str, Any] | None:
    """Refit on ``shards``' trusted split and write ``out``; ``weight_decay`` ``"cv"``: chosen by 5-fold
    cross-validation from ``WEIGHT_DECAYS``; ``max_images``: a seeded random subset of that many trusted images
    (to measure how many a refit needs). The main process does the work and returns the record; other ranks
    return None at once: the fit is one process's, and a rank waiting for it in a barrier would wait under the
    process group's collective timeout, which a long fit (cross-validation over many trusted images) can pass."""
    out = Path(out)
    if weight_decay != CROSS_VALIDATE and not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise JobError(f"--weight-decay must be a number >= 0 or {CROSS_VALIDATE!r}, got {weight_decay!r}")
    if out.exists() and any(out.iterdir()):
        raise JobError(f"{out} is not empty; choose a new --out (the refitted model is a model of its own)")
    if max_images is not None and max_images < 1:
        raise JobError(f"--max-images must be at least 1, got {max_images}")
    classes = read_model_description(checkpoint)[1]["num_classes"]
    if max_images is not None and max_images < classes:  # before any work: it cannot hold an image of each class
        raise JobError(f"--max-images {max_images} is fewer than the model's {classes} classes: a refit needs an image "
                       f"of each; raise --max-images to at least {classes}")
    state = PartialState(cpu=device == "cpu")
    if not state.is_main_process:
        return None
    start = time.perf_counter()
    dev = job_device(state, device)
    model, cfg, meta = load_trained(checkpoint, dev)
    stream = with_overrides(StreamOptions.for_scoring(cfg.data), timeout, retries)  # every trusted image, or an error
    manifest = load_matching_manifest(shards, meta, stream=stream)
    _check_trusted(manifest, shards)
    loader = eval_loader(shards, manifest, SPLIT, batch_size, num_workers, by_rank=False, stream=stream)
    data = layer_inputs(model, loader, build_transform(cfg, spectra=False), dev)
    _check_every_class(data["labels"], meta, f"the trusted split of {shards}", "build shards with a larger "
                       "--trusted-count")
    total = len(data["labels"])
    if max_images is not None and max_images < total:
        # a seeded random subset: shards keep their source's order, which is by class for a folder tree
        keep = torch.randperm(len(data["labels"]), generator=torch.Generator().manual_seed(0))[:max_images]
        data = {k: v if k == "constant" else v[keep] for k, v in data.items()}
        # the split holds every class, so a class missing now is the subset's doing, and so is the fix
        _check_every_class(data["labels"], meta, f"--max-images {max_images} (a seeded random {max_images} of the "
                           f"{total} trusted images kept)", "raise --max-images")
    layer, width = refit_layer(model)
    trained = read_head(layer, width, data["constant"])
    features, labels = data["features"], data["labels"]
    if weight_decay == CROSS_VALIDATE:
        weight_decay, cv_accuracy = choose_weight_decay(features, labels, trained)
    else:
        cv_accuracy = {}
    refitted = fit_head(features, labels, trained, weight_decay)
    write_head(layer, width, data["constant"], refitted)
    record = {"checkpoint": str(checkpoint), "shards": str(shards), "split": SPLIT, "samples": len(data["labels"]),
              "layer": "fusion head, SFRN half (mind control)" if width < layer.in_features else "classifier",
              "weight_decay": weight_decay,
              "chosen_by": "5-fold cross-validation on the trusted split" if cv_accuracy else "given",
              "cross_validated_accuracy": {f"{k:g}": round(v, 4) for k, v in cv_accuracy.items()},
              "trusted_accuracy_before": round(accuracy(trained, features, labels), 4),
              "trusted_accuracy_after": round(accuracy(refitted, features, labels), 4)}
    save_model(out / MODEL_DIR, model.state_dict(), cfg, {**meta, "head_refit": record})
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / REFIT_FILE, record)
    return record


def describe(record: dict[str, Any], out: str | Path) -> str:
    """What the CLI prints: the penalty, the trusted accuracy, and what to run next."""
    how = (f"chosen from {', '.join(f'{float(k):g}' for k in record['cross_validated_accuracy'])} by 5-fold "
           f"cross-validation (held-out accuracy {max(record['cross_validated_accuracy'].values()):.3f})"
           if record["cross_validated_accuracy"] else "as given")
    return (f"refitted the {record['layer']} on {record['samples']} trusted images: weight decay "
            f"{record['weight_decay']:g} {how}; trusted accuracy {record['trusted_accuracy_before']:.3f} -> "
            f"{record['trusted_accuracy_after']:.3f}\nwrote {Path(out) / MODEL_DIR} and {Path(out) / REFIT_FILE}; "
            f"score it with mcci eval --checkpoint {out} --shards SHARDS")

