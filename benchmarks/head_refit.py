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

from benchmarks.common import write_result
from mcci_models import MCCI
from pipeline.components.head_refit import Head, fit_head, layer_inputs, read_head, refit_layer
from pipeline.components.models import build_transform, load_matching_manifest, load_trained
from pipeline.components.scoring import COLUMNS, flagged_rows, score_samples
from pipeline.data.loaders import eval_loader
from pipeline.data.transforms import InputTransform
from pipeline.support.metrics import Counts, attack_targets, count_clean, count_triggered


def split_features(model: MCCI, shards: str, manifest: dict[str, Any], split: str, transform: InputTransform,
                   device: torch.device, batch_size: int, num_workers: int) -> dict[str, torch.Tensor]:
    """What the head reads under mind control (the SFRN's features) for every sample of ``split``."""
    return layer_inputs(model, eval_loader(shards, manifest, split, batch_size, num_workers), transform, device)


def scores(head: Head, test: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]) -> dict[str, float]:
    """CA on the clean test split, ASR and RA on the triggered one, counted as ``mcci eval`` counts them."""
    weight, bias = head
    clean, triggered = test["test-clean"], test["test-poisoned"]
    targets = attack_targets(triggered["orig_labels"], int(manifest["target"]), manifest.get("mode", "all-to-one"),
                             manifest["num_classes"])
    counts = Counts().as_tensor()
    counts[Counts.CLEAN] += count_clean((clean["features"] @ weight.T + bias).argmax(1), clean["orig_labels"])
    counts[Counts.TRIGGERED] += count_triggered((triggered["features"] @ weight.T + bias).argmax(1),
                                                triggered["orig_labels"], targets)
    return {k: round(v, 4) for k, v in Counts.from_tensor(counts).metrics().items()}


def head_refit(run: str | Path, shards: str, weight_decay: float = 1e-3, trusted_weight_decay: float = 1e-2,
               device: str = "cpu", batch_size: int = 256, num_workers: int = 0) -> dict[str, Any]:
    """The mind-control head as trained and refitted three ways (module docstring), each scored on the test
    shards; the trusted refit only where the shards hold trusted images."""
    dev = torch.device(device)
    model, cfg, meta = load_trained(run, dev)
    if not isinstance(model, MCCI):
        raise SystemExit(f"{run} is an undefended model; the head refit reads an MCCI model's SFRN")
    manifest = load_matching_manifest(shards, meta, same_data=True)
    has_trusted = manifest["splits"].get("trusted", {}).get("count", 0) > 0
    images_only = build_transform(cfg, spectra=False)
    data = {split: split_features(model, shards, manifest, split, images_only, dev, batch_size, num_workers)
            for split in ("train", "test-clean", "test-poisoned", *(("trusted",) if has_trusted else ()))}
    # a second pass over the training set, for the audit's own flags: simpler than re-deriving its rule here
    rows = score_samples(model, shards, manifest, "train", build_transform(cfg), dev, batch_size, num_workers)
    flagged_mask = flagged_rows(rows)
    flagged_indices = rows[flagged_mask, COLUMNS.index("index")].long()
    train = data["train"]
    kept = ~torch.isin(train["indices"], flagged_indices)
    trained = read_head(*refit_layer(model), data["train"]["constant"])
    heads = {
        "mind control (as trained)": trained,
        "refit on every training sample": fit_head(train["features"], train["labels"], trained, weight_decay),
        "refit on the samples the audit does not flag": fit_head(train["features"][kept], train["labels"][kept],
                                                                 trained, weight_decay),
    }
    if has_trusted:
        heads["refit on the trusted split"] = fit_head(data["trusted"]["features"], data["trusted"]["labels"], trained,
                                                       trusted_weight_decay)
    poisoned = rows[:, COLUMNS.index("poisoned")] > 0
    return {"run": str(run), "shards": str(shards), "attack": manifest["attack"]["name"],
            "train_samples": len(train["labels"]), "flagged": len(flagged_indices),
            "poisoned": int(poisoned.sum()), "poisoned_left_unflagged": int((poisoned & ~flagged_mask).sum()),
            "trusted_samples": len(data["trusted"]["labels"]) if has_trusted else 0,
            "weight_decay": weight_decay, "trusted_weight_decay": trusted_weight_decay,
            "heads": {name: scores(head, data, manifest) for name, head in heads.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an `mcci train` out folder of an MCCI model")
    parser.add_argument("--shards", required=True, help="the shards it was trained on")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="L2 on the refitted weights")
    parser.add_argument("--trusted-weight-decay", type=float, default=1e-2,
                        help="L2 for the refit on the (small) trusted split")
    parser.add_argument("--device", default="cpu", help="where the SFRN runs (cpu, cuda); the refit is on the CPU")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", help="the JSON result (default: docs/results/head_refit-DATE.json)")
    args = parser.parse_args()
    write_result("head_refit", head_refit(args.run, args.shards, args.weight_decay, args.trusted_weight_decay,
                                          args.device, args.batch_size, args.num_workers), args.out)


if __name__ == "__main__":
    main()
