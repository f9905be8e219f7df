"""The ``isolate`` variant's switch: mid-training, a rule picks the training samples to unlearn, as Anti-Backdoor
Learning (Li et al., NeurIPS 2021) isolates its low-loss samples; ``variants/isolate.py`` then unlearns them.
``train.isolate_by``:

- ``audit``: the audit's rule (``pipeline/components/scoring.py``), the samples whose label only the AIN
  explains. It needs a label that conflicts with the image (dirty-label poison).
- ``loss``: ABL's own rule: the ``train.isolate_fraction`` of samples the model fits best (lowest cross-entropy).
  A clean-label trigger (SIG) conflicts with no label, but a backdoor is learnt sooner than clean features.
- ``ain_loss``: the same rule read off the AIN's half of the head alone: what the AIN by itself fits best.

The record of a switch (the audit's summary, with precision and recall where the shards record the
poison, and the sorted flagged sample indices) is plain JSON: ``isolation.json`` in the run folder and
the ``isolation`` entry of each later checkpoint's ``trainer.json``, from which a resumed run takes it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate.utils import gather_object

from mcci_models import MCCI
from pipeline.components.distributed import broadcast_buffers_from_main
from pipeline.components.evaluation import set_model_reference
from pipeline.components.scoring import COLUMNS, flagged_rows, score_samples, summarise
from pipeline.data.storage import StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.config import Config

ISOLATION = "isolation.json"


@torch.no_grad()
def isolate(model: MCCI, cfg: Config, manifest: dict[str, Any], transform: InputTransform, device: torch.device,
            autocast: Callable[[], Any]) -> dict[str, Any]:
    """Score the training split with the model as it is now and return the switch's record, the same on
    every rank. The model (unwrapped) gets a mind-control reference from ``cfg.reference``, as validation
    gives it, and is left in eval mode; each rank scores its share of the shards and the rows are gathered.
    Every rank scores with rank 0's BatchNorm statistics, the ones a checkpoint keeps: under DDP each rank's
    last forward updated its own (DDP sends rank 0's before each training forward, so training is unchanged)."""
    broadcast_buffers_from_main(model)
    stream = StreamOptions.from_config(cfg.data)
    r = cfg.reference
    model.eval()
    with autocast():  # DeepSpeed's bf16/fp16 weights take the fp32 inputs only under autocast
        set_model_reference(model, cfg.data.shards, manifest, r.kind, r.source, r.count, transform, device, stream)
        rows = score_samples(model, cfg.data.shards, manifest, "train", transform, device, cfg.data.eval_batch_size,
                             cfg.data.num_workers, stream)
    rows = torch.cat(gather_object([rows]))
    rule, fraction = cfg.train.isolate_by, cfg.train.isolate_fraction
    flagged = isolation_rows(rows, rule, fraction)
    # the summary's AUROC ranks by the rule's own score: the audit's, or how well a sample is fitted
    score = None if rule == "audit" else -rows[:, COLUMNS.index(rule)]
    return {"rule": rule, **({} if rule == "audit" else {"fraction": fraction}),
            **summarise(rows, flagged, score), "flagged_indices": flagged_indices(rows, flagged)}


def isolation_rows(rows: torch.Tensor, rule: str, fraction: float | None = None) -> torch.Tensor:
    """Which scored rows (``scoring.COLUMNS``) the rule isolates, as a bool mask: ``audit``, the audit's rule;
    ``loss`` or ``ain_loss``, the ``fraction`` of rows lowest in that column (ties by sample index, so every
    world size picks the same set)."""
    if rule == "audit":
        return flagged_rows(rows)
    if fraction is None:
        raise ValueError(f"isolation by {rule} needs the fraction of samples to isolate")
    by_index = rows[:, COLUMNS.index("index")].argsort()
    order = by_index[rows[by_index, COLUMNS.index(rule)].argsort(stable=True)]
    mask = torch.zeros(len(rows), dtype=torch.bool)
    mask[order[:round(fraction * len(rows))]] = True
    return mask


def flagged_indices(rows: torch.Tensor, flagged: torch.Tensor | None = None) -> list[int]:
    """The sample indices of the flagged rows (default: the audit's rule) among scored rows, sorted."""
    flagged = flagged_rows(rows) if flagged is None else flagged
    return sorted(int(i) for i in rows[flagged, COLUMNS.index("index")].tolist())


def describe_isolation(record: dict[str, Any]) -> str:
    """One line for the console: how many were flagged and, where the shards record the poison, how well."""
    line = (f"isolation after epoch {record['epoch']} ({record.get('rule', 'audit')}): {record['flagged']} of "
            f"{record['samples']} training samples flagged, unlearned from now on")
    truth = record.get("recorded_poisoned")
    if truth:
        line += (f"; {truth['flagged']} of the {truth['count']} recorded poisoned (precision {truth['precision']:.3f}, "
                 f"recall {truth['recall']:.3f})")
    return line
