"""The ``isolate`` variant's switch: mid-training, the audit's rule (``pipeline/components/scoring.py``)
isolates the training samples whose label only the AIN explains, as Anti-Backdoor Learning (Li et al.,
NeurIPS 2021) isolates its low-loss samples; ``losses.unlearning_loss`` then unlearns them.

The record of a switch (the audit's summary, with precision and recall where the shards record the
poison, and the sorted flagged sample indices) is plain JSON: ``isolation.json`` in the run folder and
the ``isolation`` entry of each later checkpoint's ``trainer.json``, from which a resumed run takes it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate.utils import broadcast, gather_object

from mcci_models import MCCI
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
    for buffer in model.buffers():
        if buffer.is_floating_point():
            broadcast(buffer, from_process=0)
    stream = StreamOptions.from_config(cfg.data)
    r = cfg.reference
    model.eval()
    with autocast():  # DeepSpeed's bf16/fp16 weights take the fp32 inputs only under autocast
        set_model_reference(model, cfg.data.shards, manifest, r.kind, r.source, r.count, transform, device, stream)
        rows = score_samples(model, cfg.data.shards, manifest, "train", transform, device, cfg.data.eval_batch_size,
                             cfg.data.num_workers, stream)
    rows = torch.cat(gather_object([rows]))
    return {**summarise(rows), "flagged_indices": flagged_indices(rows)}


def flagged_indices(rows: torch.Tensor) -> list[int]:
    """The sample indices the audit's rule flags among scored rows (``scoring.COLUMNS``), sorted."""
    return sorted(int(i) for i in rows[flagged_rows(rows), COLUMNS.index("index")].tolist())


def describe_isolation(record: dict[str, Any]) -> str:
    """One line for the console: how many were flagged and, where the shards record the poison, how well."""
    line = (f"isolation after epoch {record['epoch']}: {record['flagged']} of {record['samples']} training samples "
            "flagged, unlearned from now on")
    truth = record.get("recorded_poisoned")
    if truth:
        line += (f"; {truth['flagged']} of the {truth['count']} recorded poisoned (precision {truth['precision']:.3f}, "
                 f"recall {truth['recall']:.3f})")
    return line
