"""One defense experiment: shards for an attack -> baseline and MCCI on them -> metrics with DER,
and the audit of the MCCI model's training set.

``mcci quickstart`` and ``benchmarks/defense_matrix.py`` are this function with other arguments.
The full configuration (shard build, training config after overrides, references) is written to
``out/experiment.json`` before any work. A folder holding another configuration's results is
refused; with the same configuration each stage whose output exists is skipped, so an interrupted
experiment continues and a finished one's ``metrics.json`` is reused (and the reuse is said).
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
from pipeline.support.config import load_config, to_dict
from pipeline.support.errors import JobError
from pipeline.support.report import add_der, write_json
from shards.build import BuildSpec, build_shards

ALTERNATIVE_REFERENCES = ("spectrum:trusted:100", "feature:train:1000", "spectrum:test-clean:100", "feature:trusted:1")
CONFIG_FILE = "experiment.json"
# Set per run by run_experiment, so not part of what makes two experiments the same.
_PER_RUN_KEYS = ("data.shards", "train.out", "train.defense", "train.resume")


def experiment_config(shards: BuildSpec, config: str | None, overrides: list[str],
                      references: tuple[str, ...]) -> dict[str, Any]:
    """Everything that decides an experiment's results, as plain JSON (the training config resolved,
    so a changed config file counts as well as a changed override)."""
    train_cfg = to_dict(load_config(config, overrides))
    for key in _PER_RUN_KEYS:
        section, name = key.split(".")
        train_cfg[section].pop(name)
    build = {k: v for k, v in dataclasses.asdict(shards).items() if k not in ("out", "workers", "overwrite")}
    return json.loads(json.dumps({"shards": build, "config": train_cfg, "references": list(references)}))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


def _claim(out: Path, wanted: dict[str, Any]) -> None:
    """Record ``wanted`` in a new or empty ``out``; in an earlier experiment's folder, refuse unless
    it recorded the same configuration."""
    recorded = out / CONFIG_FILE
    if recorded.exists():
        changed = _differences(json.loads(recorded.read_text()), wanted)
        if changed:
            raise JobError(f"{out} holds an experiment with another configuration ({'; '.join(changed[:3])}"
                           f"{'; ...' if len(changed) > 3 else ''}); choose another output folder or delete it")
        return
    if out.exists() and any(out.iterdir()):
        raise JobError(f"{out} is not empty and has no {CONFIG_FILE}, so what it holds cannot be matched to this "
                       "configuration; choose another output folder or delete it")
    write_json(recorded, wanted)


def run_experiment(out: str | Path, shards: BuildSpec, config: str | None = None, overrides: list[str] = (),
                   references: tuple[str, ...] = ALTERNATIVE_REFERENCES, num_workers: int = 0) -> dict[str, Any]:
    """Build ``shards`` into ``out/shards`` (unless there), train both models, evaluate; writes
    ``out/metrics.json`` and returns it (or returns the one already there: delete it to re-evaluate)."""
    out = Path(out)
    _claim(out, experiment_config(shards, config, overrides, references))
    if (out / "metrics.json").exists():
        print(f"reusing {out / 'metrics.json'}: {out / CONFIG_FILE} shows the same configuration "
              "(delete metrics.json to evaluate again)", flush=True)
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
