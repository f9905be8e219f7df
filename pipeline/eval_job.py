"""``mcci eval``: metrics of a trained model on a shard folder's test splits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from mcci_models import MCCI
from pipeline.checkpoint import read_model_files
from pipeline.evaluate import evaluate, set_model_reference
from pipeline.stream import load_manifest
from pipeline.train import build_model, build_transform

REFERENCE_HELP = "KIND:SOURCE:COUNT, e.g. feature:trusted:100 or spectrum:test-clean:100 (COUNT 1 = one image)"


class EvalError(ValueError):
    pass


def parse_reference(text: str) -> tuple[str, str, int]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        raise EvalError(f"--reference {text!r} must be {REFERENCE_HELP}")
    return parts[0], parts[1], int(parts[2])


def load_trained(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    cfg, meta, weights = read_model_files(checkpoint)
    model = build_model(cfg, meta["num_classes"], meta["image_size"], load_pretrained=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise EvalError(f"{checkpoint}: weights do not match its config ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), cfg, meta


def load_matching_manifest(shards: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The shard folder's manifest, if its classes and image size are the model's."""
    manifest = load_manifest(shards)
    if manifest["num_classes"] != meta["num_classes"] or manifest["image_size"] != meta["image_size"]:
        raise EvalError(f"{shards} has {manifest['num_classes']} classes at {manifest['image_size']} px; the model "
                        f"expects {meta['num_classes']} at {meta['image_size']} px")
    return manifest


def evaluate_checkpoint(checkpoint: str | Path, shards: str, references: list[str] = (),
                        batch_size: int = 256, num_workers: int = 2, device: str | None = None) -> dict[str, Any]:
    """Metrics of a saved model: ``{"baseline": {...}}`` or ``{"mcci": {"own", "mind_control"}}``;
    with ``references``, also mind control under each alternative reference (the stored one is kept).

    Under ``torchrun``/``accelerate launch`` each rank reads its share of the test shards and the
    counts are summed, so every sample counts once; every rank returns the same metrics.
    """
    state = PartialState(cpu=device == "cpu")
    dev = torch.device(device) if device and state.num_processes == 1 else state.device
    model, cfg, meta = load_trained(checkpoint, dev)
    manifest = load_matching_manifest(shards, meta)
    transform = build_transform(cfg)
    def run(modes: tuple[str, ...] | None = None) -> dict[str, Any]:
        return evaluate(model, shards, manifest, transform, dev, batch_size, num_workers, modes=modes,
                        reduce=lambda t: reduce(t, "sum"))

    if not isinstance(model, MCCI):
        return {"baseline": run()}
    results: dict[str, Any] = {"mcci": run(), "reference": meta["reference"]}
    stored = (model.reference_feature.clone(), model.reference_spectrum.clone())
    alternatives = {}
    for text in references:
        kind, source, count = parse_reference(text)
        set_model_reference(model, shards, manifest, kind, source, count, transform, dev)
        alternatives[text] = run(("mind_control",))["mind_control"]
    if alternatives:
        model.reference_feature.copy_(stored[0])
        model.reference_spectrum.copy_(stored[1])
        results["references"] = alternatives
    return results
