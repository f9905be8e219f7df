"""``mcci audit``: rank the training samples by how much only the AIN explains their label.

MCCI trains the AIN to account for label conflicts: a triggered image of a dog labelled "plane" is
fitted through the AIN's view of its spectrum, while the SFRN keeps seeing a dog. Mind control shows
every input to the AIN as clean, so for each training sample the audit compares the model as trained
(its own spectrum) with mind control (the reference AIN feature), on the same SFRN features:

    score = log p_own(label) - log p_mind_control(label)

how much the sample's own spectrum raises the probability of its training label. A sample is
**flagged** when the model as trained predicts its label and mind control does not. Where the shards
record which samples were poisoned (`mcci shards build` does), the summary also gives precision,
recall and AUROC of the score against that record.

Outputs in ``--out``: ``audit.json`` (summary), ``samples.jsonl`` (one line per sample, most suspicious
first), ``scores.png`` (score histogram, split by the recorded truth when there is one).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from sklearn.metrics import roc_auc_score

from mcci_models import MCCI
from pipeline.components.models import build_transform, job_device, load_matching_manifest, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.support.errors import JobError
from pipeline.support.plots import plt, save_figure
from pipeline.support.report import write_json, write_text

COLUMNS = ("index", "label", "orig_label", "poisoned", "own_pred", "mind_control_pred", "score")


@torch.no_grad()
def score_samples(model: MCCI, location: str, manifest: dict[str, Any], split: str, transform, device: torch.device,
                  batch_size: int, num_workers: int, stream: StreamOptions = DEFAULT_STREAM) -> torch.Tensor:
    """Rows of COLUMNS (float64) for this rank's share of ``split``."""
    if not bool(model.has_reference):
        raise JobError("the model has no mind-control reference; audit the out folder of `mcci train`")
    rows = []
    for batch in eval_loader(location, manifest, split, batch_size, num_workers, stream=stream):
        batch = batch.to(device)
        inputs = transform(batch.images, train=False)
        sfrn_features, ain_features = model.features(inputs.images, inputs.spectra)
        own = F.log_softmax(model.fuse(sfrn_features, ain_features).float(), dim=1)
        reference = model.reference_feature.expand(sfrn_features.shape[0], -1)
        mind_control = F.log_softmax(model.fuse(sfrn_features, reference).float(), dim=1)
        label = batch.labels[:, None]
        score = (own.gather(1, label) - mind_control.gather(1, label))[:, 0]
        rows.append(torch.stack([batch.indices.double(), batch.labels.double(), batch.orig_labels.double(),
                                 batch.poisoned.double(), own.argmax(1).double(), mind_control.argmax(1).double(),
                                 score.double()], dim=1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(COLUMNS), dtype=torch.float64)


def flagged_rows(rows: torch.Tensor) -> torch.Tensor:
    """The audit's rule: the model as trained predicts the training label and mind control does not."""
    label = rows[:, COLUMNS.index("label")]
    return (rows[:, COLUMNS.index("own_pred")] == label) & (rows[:, COLUMNS.index("mind_control_pred")] != label)


def summarise(rows: torch.Tensor) -> dict[str, Any]:
    """Counts and, where samples were recorded as poisoned, how well the audit finds them."""
    col = {name: rows[:, i] for i, name in enumerate(COLUMNS)}
    flagged = flagged_rows(rows)
    poisoned = col["poisoned"].bool()
    summary: dict[str, Any] = {
        "samples": len(rows), "flagged": int(flagged.sum()),
        "flagged_fraction": round(float(flagged.float().mean()), 6) if len(rows) else 0.0,
        "score_quantiles": {f"p{q}": round(float(torch.quantile(col["score"], q / 100)), 4)
                            for q in (50, 90, 99)} if len(rows) else {},
    }
    if 0 < int(poisoned.sum()) < len(rows):
        hits = int((flagged & poisoned).sum())
        summary["recorded_poisoned"] = {
            "count": int(poisoned.sum()), "flagged": hits,
            "precision": round(hits / max(int(flagged.sum()), 1), 4),
            "recall": round(hits / int(poisoned.sum()), 4),
            "auroc": round(float(roc_auc_score(poisoned.numpy(), col["score"].numpy())), 4),
            # of the k highest scores, k = the recorded count: the figure a fixed review budget sees
            "precision_at_count": round(float(poisoned[col["score"].argsort(descending=True)[:int(poisoned.sum())]]
                                              .float().mean()), 4),
        }
    return summary


def plot_scores(rows: torch.Tensor, path: Path) -> None:
    score = rows[:, COLUMNS.index("score")].numpy()
    poisoned = rows[:, COLUMNS.index("poisoned")].numpy() > 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [("recorded clean", ~poisoned), ("recorded poisoned", poisoned)] if poisoned.any() else [("all", ~poisoned)]
    bins = np.histogram_bin_edges(score, bins=60)  # shared, so the groups' bars line up
    for name, mask in groups:
        ax.hist(score[mask], bins=bins, alpha=0.6, label=f"{name} ({int(mask.sum())})", log=True)
    ax.set_xlabel("log p_own(label) - log p_mind_control(label)")
    ax.set_ylabel("training samples")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def audit(checkpoint: str | Path, shards: str, out: str | Path, split: str = "train", batch_size: int = 256,
          num_workers: int = 2, device: str | None = None) -> dict[str, Any] | None:
    """Score every sample of ``split`` once (across ranks under torchrun); the main process writes the
    outputs and returns the summary, other ranks return None."""
    state = PartialState(cpu=device == "cpu")
    dev = job_device(state, device)
    model, cfg, meta = load_trained(checkpoint, dev)
    if not isinstance(model, MCCI):
        raise JobError(f"{checkpoint} is an undefended model (train.defense={cfg.train.defense}); the audit needs "
                        "an MCCI model, whose AIN is what separates poisoned samples")
    manifest = load_matching_manifest(shards, meta, same_data=True)  # the audit is of the training set
    if split not in manifest["splits"]:
        raise JobError(f"{shards} has no split {split!r}; splits: {sorted(manifest['splits'])}")
    rows = score_samples(model, shards, manifest, split, build_transform(cfg), dev, batch_size, num_workers,
                         StreamOptions.from_config(cfg.data))
    rows = torch.cat(gather_object([rows]))
    if not state.is_main_process:
        return None
    rows = rows[rows[:, COLUMNS.index("index")].argsort()]  # ties keep index order, whatever the world size
    rows = rows[rows[:, COLUMNS.index("score")].argsort(descending=True, stable=True)]
    summary = {"checkpoint": str(checkpoint), "shards": str(shards), "split": split,
               "attack_recorded": manifest["attack"]["name"], **summarise(rows)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for row, flagged in zip(rows.tolist(), flagged_rows(rows).tolist()):
        record = {name: (int(v) if name != "score" else round(v, 5)) for name, v in zip(COLUMNS, row)}
        record["poisoned"] = bool(record["poisoned"])
        record["flagged"] = flagged
        lines.append(record)
    write_text(out / "samples.jsonl", "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
    plot_scores(rows, out / "scores.png")
    write_json(out / "audit.json", summary)
    return summary

