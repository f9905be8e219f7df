"""One defense experiment: shards for an attack -> baseline and MCCI on them -> metrics with DER,
and the audit of the MCCI model's training set.

``mcci quickstart`` and ``benchmarks/defense_matrix.py`` are this function with other arguments.
Each stage is skipped when its output already exists, so an interrupted experiment continues.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pipeline.jobs.audit import audit
from pipeline.jobs.evaluate import evaluate_checkpoint
from pipeline.jobs.train import train
from pipeline.support.config import load_config
from pipeline.support.report import add_der, write_json
from shards.build import BuildSpec, build_shards

ALTERNATIVE_REFERENCES = ("spectrum:trusted:100", "feature:train:1000", "spectrum:test-clean:100", "feature:trusted:1")


def run_experiment(out: str | Path, shards: BuildSpec, config: str | None = None, overrides: list[str] = (),
                   references: tuple[str, ...] = ALTERNATIVE_REFERENCES, num_workers: int = 0) -> dict[str, Any]:
    """Build ``shards`` into ``out/shards`` (unless there), train both models, evaluate; writes
    ``out/metrics.json`` and returns it (or returns the one already there: delete it to re-evaluate)."""
    out = Path(out)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    start = time.perf_counter()
    shard_dir = out / "shards"
    if not (shard_dir / "manifest.json").exists():
        build_shards(dataclasses.replace(shards, out=str(shard_dir)))
    runs = {}
    for name, defense in (("baseline", "none"), ("mcci", "mcci")):
        run_dir = out / name
        if not (run_dir / "model").exists():
            print(f"== training {name} ==", flush=True)
            resume = ["train.resume=true"] if run_dir.exists() else []
            train(load_config(config, [*overrides, f"data.shards={shard_dir}", f"train.defense={defense}",
                                       f"train.out={run_dir}", *resume]))
        runs[name] = run_dir
    baseline = evaluate_checkpoint(runs["baseline"], str(shard_dir), num_workers=num_workers)
    mcci = evaluate_checkpoint(runs["mcci"], str(shard_dir), list(references), num_workers=num_workers)
    results = add_der({**baseline, **mcci}, baseline["baseline"])
    results["audit"] = audit(runs["mcci"], str(shard_dir), out / "audit", num_workers=num_workers)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", results)
    return results
