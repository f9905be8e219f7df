"""Where MCCI's clean-accuracy cost lives, and whether its SFRN still carries the trigger: refit the head.

    python -m benchmarks.head_refit --run runs/matrix/badnets/mcci --shards runs/matrix/badnets/shards

Under mind control the AIN's part of the fused head is one constant vector, so the model predicts with the
SFRN's features through the SFRN's half of the head, a half trained beside a live AIN. This refits that half
(weights and bias, multinomial logistic regression, L-BFGS from the trained values) on the SFRN's features of
the training set three ways and scores each on the test shards (CA, ASR, RA):

- ``refit on every training sample``: the poisoned ones included, as a user fine-tuning the head of an
  MCCI model on the same data would. If the ASR comes back, the SFRN's features still encode the trigger
  linearly and only the trained head ignores it.
- ``refit on the samples the audit does not flag``: the audit's rule (``pipeline/components/scoring.py``)
  removes most of the poison first. If this does not raise the CA much, the cost is in the SFRN's features,
  not in the head.
- ``refit on the trusted split``: the shards' held-out clean images only.

Writes a JSON result. Nothing is trained but the head, in memory; the run folder is only read.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from mcci_models import MCCI
from pipeline.components.models import build_transform, load_matching_manifest, load_trained
from pipeline.components.scoring import COLUMNS, flagged_rows, score_samples
from pipeline.data.loaders import eval_loader
from pipeline.support.metrics import attack_targets

SPLITS = ("train", "trusted", "test-clean", "test-poisoned")


@torch.no_grad()
def sfrn_features(model: MCCI, shards: str, manifest: dict[str, Any], split: str, transform) -> dict[str, torch.Tensor]:
    """The SFRN's features of every sample of ``split`` with its labels, true labels and indices."""
    parts: dict[str, list[torch.Tensor]] = {"features": [], "labels": [], "orig_labels": [], "indices": []}
    for batch in eval_loader(shards, manifest, split, 256, 0):
        parts["features"].append(model.sfrn(transform(batch.images, train=False).images).float())
        parts["labels"].append(batch.labels)
        parts["orig_labels"].append(batch.orig_labels)
        parts["indices"].append(batch.indices)
    return {k: torch.cat(v) for k, v in parts.items()}


def fit_head(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             weight_decay: float, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression from (``weight``, ``bias``), L2 ``weight_decay`` on the weights."""
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(features @ w.T + b, labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach(), b.detach()


def scores(head: tuple[torch.Tensor, torch.Tensor], test: dict[str, dict[str, torch.Tensor]],
           manifest: dict[str, Any]) -> dict[str, float]:
    """CA on the clean test split; ASR and RA on the triggered one, over inputs whose true label is not the
    attack's target (as ``mcci eval`` counts them)."""
    weight, bias = head
    clean, triggered = test["test-clean"], test["test-poisoned"]
    ca = ((clean["features"] @ weight.T + bias).argmax(1) == clean["orig_labels"]).float().mean()
    predicted = (triggered["features"] @ weight.T + bias).argmax(1)
    targets = attack_targets(triggered["orig_labels"], int(manifest["target"]), manifest.get("mode", "all-to-one"),
                             manifest["num_classes"])
    counted = triggered["orig_labels"] != targets
    return {"clean_acc": round(ca.item(), 4),
            "asr": round((predicted == targets)[counted].float().mean().item(), 4),
            "ra": round((predicted == triggered["orig_labels"])[counted].float().mean().item(), 4)}


def head_refit(run: str | Path, shards: str, weight_decay: float = 1e-3,
               trusted_weight_decay: float = 1e-2) -> dict[str, Any]:
    device = torch.device("cpu")
    model, cfg, meta = load_trained(run, device)
    if not isinstance(model, MCCI):
        raise SystemExit(f"{run} is an undefended model; the head refit reads an MCCI model's SFRN")
    manifest = load_matching_manifest(shards, meta, same_data=True)
    data = {split: sfrn_features(model, shards, manifest, split, build_transform(cfg, spectra=False))
            for split in SPLITS}
    rows = score_samples(model, shards, manifest, "train", build_transform(cfg), device, 256, 0)
    flagged = rows[flagged_rows(rows), COLUMNS.index("index")].long()
    train = data["train"]
    kept = ~torch.isin(train["indices"], flagged)
    split = train["features"].shape[1]
    weight = model.head.weight.detach()[:, :split]
    # the AIN's half under mind control: one constant vector, folded into the bias
    bias = model.head.bias.detach() + model.reference_feature @ model.head.weight.detach()[:, split:].T
    heads = {
        "mind control (as trained)": (weight, bias),
        "refit on every training sample": fit_head(train["features"], train["labels"], weight, bias, weight_decay),
        "refit on the samples the audit does not flag": fit_head(train["features"][kept], train["labels"][kept],
                                                                 weight, bias, weight_decay),
        "refit on the trusted split": fit_head(data["trusted"]["features"], data["trusted"]["labels"], weight, bias,
                                               trusted_weight_decay),
    }
    poisoned = rows[:, COLUMNS.index("poisoned")] > 0
    return {"run": str(run), "shards": str(shards), "attack": manifest["attack"]["name"],
            "train_samples": int(len(kept)), "flagged": int(len(flagged)),
            "poisoned_left_unflagged": int((poisoned & ~flagged_rows(rows)).sum()),
            "trusted_samples": int(len(data["trusted"]["labels"])), "weight_decay": weight_decay,
            "trusted_weight_decay": trusted_weight_decay,
            "heads": {name: scores(head, data, manifest) for name, head in heads.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an `mcci train` out folder of an MCCI model")
    parser.add_argument("--shards", required=True, help="the shards it was trained on")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--out", help="the JSON result (default: benchmarks/results/head_refit-DATE.json)")
    args = parser.parse_args()
    write_result("head_refit", head_refit(args.run, args.shards, args.weight_decay), args.out)


if __name__ == "__main__":
    main()
