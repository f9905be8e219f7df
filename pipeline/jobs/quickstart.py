"""``mcci quickstart``: the whole method end to end, offline, on the CPU, in a few minutes.

Embedded data (scikit-learn's UCI handwritten digits, 10 classes, 32 px) -> BadNets shards
(10 %, target 0) -> the undefended baseline and MCCI, trained on the same shards -> metrics of
both, with DER, in ``<out>/metrics.json`` and as a table, and the audit of the training set in
``<out>/audit``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.jobs.experiment import run_experiment
from pipeline.support.report import format_audit, format_table
from shards.build import BuildSpec

QUICKSTART_SOURCE = "embedded:digits"
# Everything else is the defaults of pipeline/config.py (reference AIN design, log spectra,
# feature reference from the trusted split).
QUICKSTART_OVERRIDES = [
    "model.sfrn=mcci_convnet_tiny",
    "model.ain_widths=[16,32,64]",
    "data.batch_size=64",
    "data.num_workers=0",
    "data.shuffle_buffer=1500",
    "data.augment.translate=0.0625",
    "data.augment.hflip=false",  # digits are not mirror-symmetric
    "optim.name=adamw",
    "optim.lr=2e-3",
    "optim.weight_decay=0.05",
    "optim.warmup_epochs=1",
    "train.log_every=20",
    "train.cpu=true",
]


# BadNets, 10 % -> class 0; run_experiment sets the output folder.
QUICKSTART_SHARDS = BuildSpec(source=QUICKSTART_SOURCE, out="", attack="badnets", poison_rate=0.1, target=0, seed=0,
                              shard_size=256)


def quickstart(out: str | Path = "runs/quickstart", epochs: int = 12) -> dict[str, Any]:
    results = run_experiment(out, QUICKSTART_SHARDS, overrides=[*QUICKSTART_OVERRIDES, f"train.epochs={epochs}"])
    print(format_table(results))
    print(format_audit(results["audit"]))
    print(f"metrics in {Path(out) / 'metrics.json'} (computed in {results['seconds']} s)")
    return results
