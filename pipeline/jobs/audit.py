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
from accelerate import PartialState
from accelerate.utils import gather_object

from mcci_models import MCCI
from pipeline.components.models import build_transform, job_device, load_matching_manifest, load_trained
# the scores and the rule live in components, where the isolate training variant uses them too
from pipeline.components.scoring import COLUMNS, FLOAT_COLUMNS, flagged_rows, score_samples, summarise
from pipeline.data.storage import StreamOptions, with_overrides
from pipeline.support.errors import JobError
from pipeline.support.plots import plt, save_figure
from pipeline.support.report import write_json, write_text


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
          num_workers: int = 2, device: str | None = None, timeout: float | None = None,
          retries: int | None = None) -> dict[str, Any] | None:
    """Score every sample of ``split`` once (across ranks under torchrun); the main process writes the
    outputs and returns the summary, other ranks return None."""
    state = PartialState(cpu=device == "cpu")
    dev = job_device(state, device)
    model, cfg, meta = load_trained(checkpoint, dev)
    if not isinstance(model, MCCI):
        raise JobError(f"{checkpoint} is an undefended model (train.defense={cfg.train.defense}); the audit needs "
                        "an MCCI model, whose AIN is what separates poisoned samples")
    stream = with_overrides(StreamOptions.for_scoring(cfg.data), timeout, retries)  # hashed, none skipped
    manifest = load_matching_manifest(shards, meta, same_data=True, stream=stream)  # the audit is of the training set
    if split not in manifest["splits"]:
        raise JobError(f"{shards} has no split {split!r}; splits: {sorted(manifest['splits'])}")
    rows = score_samples(model, shards, manifest, split, build_transform(cfg), dev, batch_size, num_workers, stream)
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
        record = {name: round(v, 5) if name in FLOAT_COLUMNS else int(v) for name, v in zip(COLUMNS, row)}
        record["poisoned"] = bool(record["poisoned"])
        record["flagged"] = flagged
        lines.append(record)
    write_text(out / "samples.jsonl", "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
    plot_scores(rows, out / "scores.png")
    write_json(out / "audit.json", summary)
    return summary

