"""``mcci quickstart``: the whole method end to end, offline, on the CPU, in a few minutes.

Embedded data (scikit-learn's UCI handwritten digits, 10 classes, 32 px) -> BadNets shards
(10 %, target 0) -> the undefended baseline and MCCI, trained on the same shards -> metrics of
both, with DER, in ``<out>/metrics.json`` and as a table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.eval_job import evaluate_checkpoint
from pipeline.report import add_der, format_table, write_json
from pipeline.train import train
from shards.build import BuildSpec, build_shards

QUICKSTART_SOURCE = "embedded:digits"
# Everything else is the defaults of pipeline/config.py (small CNN SFRN, reference AIN, log spectra,
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
ALTERNATIVE_REFERENCES = ["spectrum:trusted:100", "feature:train:1000", "spectrum:test-clean:100", "feature:trusted:1"]


def quickstart(out: str | Path = "runs/quickstart", epochs: int = 12, extra_overrides: list[str] = ()) -> dict[str, Any]:
    out = Path(out)
    start = time.perf_counter()
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        build_shards(BuildSpec(source=QUICKSTART_SOURCE, out=str(shards), attack="badnets", poison_rate=0.1,
                               target=0, seed=0, shard_size=256))
    runs = {}
    for name, defense in (("baseline", "none"), ("mcci", "mcci")):
        overrides = [*QUICKSTART_OVERRIDES, f"data.shards={shards}", f"train.defense={defense}",
                     f"train.epochs={epochs}", f"train.out={out / name}", *extra_overrides]
        run_dir = out / name
        if not (run_dir / "model").exists():
            print(f"== training {name} ==", flush=True)
            train(load_config(None, overrides + (["train.resume=true"] if run_dir.exists() else [])))
        runs[name] = run_dir
    baseline = evaluate_checkpoint(runs["baseline"], str(shards), num_workers=0)
    mcci = evaluate_checkpoint(runs["mcci"], str(shards), ALTERNATIVE_REFERENCES, num_workers=0)
    results = add_der({**baseline, **mcci}, baseline["baseline"])
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", results)
    print(format_table(results))
    print(f"wrote {out / 'metrics.json'} ({results['seconds']} s)")
    return results
