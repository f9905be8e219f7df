"""The audit's per-sample scores and flag rule: what only the AIN explains.

For each sample, the model as trained (its own spectrum) and mind control (the reference AIN feature)
are compared on the same SFRN features:

    score = log p_own(label) - log p_mind_control(label)

A sample is **flagged** when the model as trained predicts its label and mind control does not. ``mcci
audit`` (``pipeline/jobs/audit.py``) ranks a trained model's training set with these; the ``isolate``
training variant (``pipeline/components/isolation.py``) flags samples with them mid-training, or with a
loss: ``loss``, the model's own cross-entropy, or ``ain_loss``, that of the AIN's half of the head alone.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mcci_models import MCCI
from pipeline.data.batches import Batch
from pipeline.data.loaders import eval_loader
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.errors import JobError

COLUMNS = ("index", "label", "orig_label", "poisoned", "own_pred", "mind_control_pred", "score", "loss", "ain_loss")
FLOAT_COLUMNS = ("score", "loss", "ain_loss")


@torch.no_grad()
def score_batches(model: MCCI, batches: Iterable[Batch], transform: InputTransform,
                  device: torch.device) -> torch.Tensor:
    """Rows of COLUMNS (float64, on the CPU) for ``batches``, with the model's stored reference."""
    if not model.reference_ready:
        raise JobError("the model has no mind-control reference; audit the out folder of `mcci train`")
    rows = []
    for batch in batches:
        batch = batch.to(device)
        inputs = transform(batch.images, train=False)
        sfrn_features, ain_features = model.features(inputs.images, inputs.spectra)
        own = F.log_softmax(model.fuse(sfrn_features, ain_features).float(), dim=1)
        reference = model.reference_feature.expand(sfrn_features.shape[0], -1)
        mind_control = F.log_softmax(model.fuse(sfrn_features, reference).float(), dim=1)
        label = batch.labels[:, None]
        score = (own.gather(1, label) - mind_control.gather(1, label))[:, 0]
        ain_loss = F.cross_entropy(model.halves(sfrn_features, ain_features)[1].float(), batch.labels,
                                   reduction="none")
        rows.append(torch.stack([batch.indices.double(), batch.labels.double(), batch.orig_labels.double(),
                                 batch.poisoned.double(), own.argmax(1).double(), mind_control.argmax(1).double(),
                                 score.double(), -own.gather(1, label)[:, 0].double(), ain_loss.double()],
                                dim=1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(COLUMNS), dtype=torch.float64)


def score_samples(model: MCCI, location: str, manifest: dict[str, Any], split: str, transform: InputTransform,
                  device: torch.device, batch_size: int, num_workers: int,
                  stream: StreamOptions = DEFAULT_STREAM) -> torch.Tensor:
    """Rows of COLUMNS (float64) for this rank's share of ``split``."""
    return score_batches(model, eval_loader(location, manifest, split, batch_size, num_workers, stream=stream),
                         transform, device)


def flagged_rows(rows: torch.Tensor) -> torch.Tensor:
    """The audit's rule: the model as trained predicts the training label and mind control does not."""
    label = rows[:, COLUMNS.index("label")]
    return (rows[:, COLUMNS.index("own_pred")] == label) & (rows[:, COLUMNS.index("mind_control_pred")] != label)


def summarise(rows: torch.Tensor, flagged: torch.Tensor | None = None,
              score: torch.Tensor | None = None) -> dict[str, Any]:
    """Counts and, where samples were recorded as poisoned, how well the flags find them. ``flagged`` (bool
    per row) and ``score`` (higher: more suspect) default to the audit's rule and score."""
    col = {name: rows[:, i] for i, name in enumerate(COLUMNS)}
    flagged = flagged_rows(rows) if flagged is None else flagged
    score = col["score"] if score is None else score
    poisoned = col["poisoned"].bool()
    summary: dict[str, Any] = {
        "samples": len(rows), "flagged": int(flagged.sum()),
        "flagged_fraction": round(float(flagged.float().mean()), 6) if len(rows) else 0.0,
        "score_quantiles": {f"p{q}": round(float(torch.quantile(score, q / 100)), 4)
                            for q in (50, 90, 99)} if len(rows) else {},
    }
    if 0 < int(poisoned.sum()) < len(rows):
        hits = int((flagged & poisoned).sum())
        summary["recorded_poisoned"] = {
            "count": int(poisoned.sum()), "flagged": hits,
            "precision": round(hits / max(int(flagged.sum()), 1), 4),
            "recall": round(hits / int(poisoned.sum()), 4),
            "auroc": round(float(roc_auc_score(poisoned.numpy(), score.numpy())), 4),
            # of the k highest scores, k = the recorded count: the figure a fixed review budget sees
            "precision_at_count": round(float(poisoned[score.argsort(descending=True)[:int(poisoned.sum())]]
                                              .float().mean()), 4),
        }
    return summary
