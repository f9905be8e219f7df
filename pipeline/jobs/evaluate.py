"""``mcci eval``: metrics of a trained model on a shard folder's test splits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from mcci_models import MCCI, REFERENCE_KINDS
from mcci_models.saved import WEIGHT_KINDS, read_model_description, weight_kinds
from pipeline.components.evaluation import evaluate, set_model_reference
from pipeline.components.models import build_transform, job_device, load_matching_manifest, load_trained
from pipeline.data.manifest import fingerprint
from pipeline.data.storage import StreamOptions, with_overrides
from pipeline.support.errors import JobError

REFERENCE_HELP = "KIND:SOURCE:COUNT, e.g. feature:trusted:100 or spectrum:test-clean:100 (COUNT 1 = one image)"


REFERENCE_SOURCES = ("trusted", "train", "test-clean")  # splits of clean images (reference.source's choices)


def parse_reference(text: str, manifest: dict[str, Any] | None = None, shards: str = "") -> tuple[str, str, int]:
    """(kind, source, count) of a ``--reference``; refused before any work when the kind is unknown (it was a
    traceback), the source is not a split of clean images (test-poisoned would make triggered images the "clean"
    reference, silently) or, given the ``manifest``, the split holds no image (with the fix for that split)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        raise JobError(f"--reference {text!r} must be {REFERENCE_HELP}")
    kind, source, count = parts[0], parts[1], int(parts[2])
    if kind not in REFERENCE_KINDS:
        raise JobError(f"--reference {text!r}: unknown kind {kind!r}; use {' or '.join(REFERENCE_KINDS)} "
                       f"({REFERENCE_HELP})")
    if source not in REFERENCE_SOURCES:
        why = " (it holds triggered images: a reference must be clean)" if source == "test-poisoned" else ""
        raise JobError(f"--reference {text!r}: source {source!r} is not a split of clean images{why}; use "
                       f"{', '.join(REFERENCE_SOURCES)}")
    if manifest is not None and not manifest["splits"].get(source, {}).get("count", 0):
        fix = ("build the shards with --trusted-count N, or use another source" if source == "trusted"
               else "use another source")
        raise JobError(f"--reference {text!r}: {shards} has no {source} images; {fix}")
    return kind, source, count


def check_baseline_shards(baseline: dict[str, Any], shards_fingerprint: str, baseline_name: str, shards: str,
                          fix: str = "evaluate the undefended model on these shards") -> None:
    """Refuse an undefended model's figures (its evaluation's JSON) scored on other shards than ``shards`` (data
    fingerprint ``shards_fingerprint``), naming both: DER compares two models on the same test images. Figures that
    record no fingerprint (written before evaluations did) are taken as they are."""
    scored_on = (baseline.get("data") or {}).get("shards")
    if scored_on and scored_on != shards_fingerprint:
        raise JobError(f"{baseline_name} was evaluated on shards with data fingerprint {scored_on}, {shards} has "
                       f"{shards_fingerprint}: DER compares two models on the same test images; {fix}")


def chosen_weights(checkpoint: str | Path, weights: str | None) -> list[str]:
    """The weight kinds to score: ``raw``, ``ema``, ``both``, or None for every kind the model holds (its own
    first). A kind the model lacks is refused before any work."""
    config, meta = read_model_description(checkpoint)
    held = list(weight_kinds(meta, config))
    wanted = held if weights is None else list(WEIGHT_KINDS) if weights == "both" else [weights]
    missing = [k for k in wanted if k not in held]
    if missing:
        raise JobError(f"--weights {weights}: {checkpoint} holds {' and '.join(held)} weights, not {' and '.join(missing)}"
                       + (" (its run kept no EMA: train.ema_decay=0)" if "ema" in missing else ""))
    return [k for k in held if k in wanted]


def evaluate_checkpoint(checkpoint: str | Path, shards: str, references: list[str] = (),
                        batch_size: int = 256, num_workers: int = 2, device: str | None = None,
                        weights: str | None = None, skip_bad_shards: bool = False, timeout: float | None = None,
                        retries: int | None = None) -> dict[str, Any]:
    """Metrics of a saved model: ``{"baseline": {...}}`` or ``{"mcci": {"own", "mind_control"}}``, with
    ``"weights"`` naming the weights they are of; with ``references``, also mind control under each alternative
    reference (the stored one is kept). ``weights`` as ``chosen_weights``: with more than one kind the top level is
    the model's own weights' figures and ``"by_weights"`` holds each kind's, so a report cannot show the EMA's
    figures without the raw weights' (or the reverse).

    Every shard's sha256 is checked before its samples are scored, and a shard that cannot be read stops the
    evaluation, whatever the run's ``data.skip_bad_shards``; with ``skip_bad_shards`` it is skipped instead and
    counted in ``data.skipped`` (shards, and samples not read, over every pass this evaluation made), so figures
    over fewer samples than the split holds always say so.

    Under ``torchrun``/``accelerate launch`` each rank reads its share of the test shards and the
    counts are summed, so every sample counts once; every rank returns the same metrics.
    """
    kinds = chosen_weights(checkpoint, weights)
    for text in references:  # a reference that cannot be made is refused before any work
        parse_reference(text)
    state = PartialState(cpu=device == "cpu")
    dev = job_device(state, device)
    by_weights = {kind: _evaluate_weights(checkpoint, kind, shards, references, batch_size, num_workers, dev,
                                          skip_bad_shards, timeout, retries) for kind in kinds}
    results = dict(by_weights[kinds[0]])
    if len(kinds) > 1:
        results["by_weights"] = by_weights
    return results


def _evaluate_weights(checkpoint: str | Path, kind: str, shards: str, references: list[str], batch_size: int,
                      num_workers: int, dev, skip_bad_shards: bool, timeout: float | None = None,
                      retries: int | None = None) -> dict[str, Any]:
    model, cfg, meta = load_trained(checkpoint, dev, kind)
    # the run's verification and retry settings, with the job's --timeout / --retries; the manifest too
    stream = with_overrides(StreamOptions.for_scoring(cfg.data, skip_bad_shards), timeout, retries)
    manifest = load_matching_manifest(shards, meta, stream=stream)
    transform = build_transform(cfg)

    def run(modes: tuple[str, ...] | None = None) -> dict[str, Any]:
        return evaluate(model, shards, manifest, transform, dev, batch_size, num_workers, modes=modes,
                        reduce=lambda t: reduce(t, "sum"), stream=stream)

    # which data the figures are of: another build of the same classes (another attack, say) is allowed
    data = {"shards": fingerprint(manifest), "trained_on": meta.get("data_fingerprint")}
    if not isinstance(model, MCCI):
        return {"baseline": run(), "weights": kind, "data": {**data, "skipped": _skipped(stream, dev)}}
    results: dict[str, Any] = {"mcci": run(), "weights": kind, "reference": meta["reference"], "data": data}
    stored = (model.reference_feature.clone(), model.reference_spectrum.clone())
    for text in references:  # every one against these shards, before the first evaluation
        parse_reference(text, manifest, shards)
    alternatives = {}
    for text in references:
        ref_kind, source, count = parse_reference(text)
        set_model_reference(model, shards, manifest, ref_kind, source, count, transform, dev, stream)
        alternatives[text] = run(("mind_control",))["mind_control"]
    if alternatives:
        model.reference_feature.copy_(stored[0])
        model.reference_spectrum.copy_(stored[1])
        results["references"] = alternatives
    data["skipped"] = _skipped(stream, dev)
    return results


def _skipped(stream: StreamOptions, dev: torch.device) -> dict[str, int]:
    """The shards ``stream`` skipped and their samples not read, summed over the ranks (every rank calls this)."""
    shards, samples = reduce(torch.tensor(stream.tally.counts(), device=dev), "sum").tolist()
    return {"shards": int(shards), "samples": int(samples)}
