"""One defense experiment: shards for an attack -> baseline and MCCI on them -> metrics with DER,
and the audit of the MCCI model's training set.

``mcci quickstart`` and ``benchmarks/defense_matrix.py`` are this function with other arguments;
``run_variant`` adds another MCCI run (a variant, another seed) beside a finished experiment's, on
its shards and against the undefended model of its own ``train.seed``: the experiment's baseline for the
experiment's seed, else ``run_baseline``'s (the undefended model trained again with that seed), so a DER over
seeds pairs seed s with baseline seed s instead of resting on one baseline seed.
The full configuration (shard build, training config after overrides, references) is written to
``out/experiment.json`` before any work. A folder holding another configuration's results is
refused; with the same configuration each stage whose output exists is skipped, so an interrupted
experiment continues and a finished one's ``metrics.json`` is reused (and the reuse is said).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pipeline.components.run_checks import DEFAULTS
from pipeline.jobs.audit import audit
from pipeline.data.manifest import fingerprint, load_manifest
from pipeline.jobs.evaluate import check_baseline_shards, evaluate_checkpoint
from pipeline.jobs.train import train
from pipeline.support.config import load_config, to_dict
from pipeline.support.errors import JobError, note_kept
from pipeline.support.report import add_der, combine_results, write_json
from shards.build import BuildSpec, build_shards

ALTERNATIVE_REFERENCES = ("spectrum:trusted:100", "feature:train:1000", "spectrum:test-clean:100", "feature:trusted:1")
CONFIG_FILE = "experiment.json"
BASELINES = "baselines"  # <out>/baselines/seed<N>/: the undefended model again with train.seed=N
# Set per run by run_experiment, so not part of what makes two experiments the same.
PER_RUN_KEYS = ("data.shards", "train.out", "train.defense", "train.resume")
_PER_BUILD_FIELDS = ("out", "workers", "overwrite")  # where and how fast, not what is built


def experiment_config(shards: BuildSpec, config: str | None, overrides: list[str],
                      references: tuple[str, ...]) -> dict[str, Any]:
    """Everything that decides an experiment's results, as plain JSON (the training config resolved,
    so a changed config file counts as well as a changed override)."""
    build = {k: v for k, v in dataclasses.asdict(shards).items() if k not in _PER_BUILD_FIELDS}
    return json.loads(json.dumps({"shards": build, "config": _training_config(config, overrides),
                                  "references": list(references)}))


def _training_config(config: str | None, overrides: list[str]) -> dict[str, Any]:
    train_cfg = to_dict(load_config(config, overrides))
    for key in PER_RUN_KEYS:
        section, name = key.split(".")
        train_cfg[section].pop(name)
    return json.loads(json.dumps(train_cfg))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


def _with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recorded configuration, with the shard-build and training-config keys added since it was
    written at their defaults (they did not exist, so the run had their default behaviour)."""
    recorded = copy.deepcopy(recorded)
    for build in (recorded.get("shards"), recorded.get("experiment", {}).get("shards")):
        for field in dataclasses.fields(BuildSpec) if build else ():
            if field.default is not dataclasses.MISSING and field.name not in _PER_BUILD_FIELDS:
                build.setdefault(field.name, field.default)
    for cfg in (recorded.get("config"), recorded.get("experiment", {}).get("config")):
        for name, value in [(k, v) for k, v in DEFAULTS.items() if k not in PER_RUN_KEYS] if cfg else ():
            *parents, key = name.split(".")
            section = cfg
            for parent in parents:
                section = section.setdefault(parent, {})
            section.setdefault(key, value)
    return recorded


def _stated(values: Any, record: Any) -> Any:
    """``values`` restricted to the keys that ``record`` states, at every depth."""
    if isinstance(values, dict) and isinstance(record, dict):
        return {k: _stated(v, record[k]) for k, v in values.items() if k in record}
    return values


def _claim(out: Path, wanted: dict[str, Any]) -> None:
    """Record ``wanted`` in a new or empty ``out``; in an earlier experiment's folder, refuse unless
    it recorded the same configuration."""
    recorded = out / CONFIG_FILE
    if recorded.exists():
        claimed = json.loads(recorded.read_text())
        if "experiment" in wanted:
            # A variant's claim copies its experiment's record. Only the keys that record states are the
            # experiment's: one it lacks did not exist when the experiment ran, and an older version wrote
            # such keys into the claim at the default of its day (a default that may have changed since).
            claimed["experiment"] = _stated(claimed.get("experiment", {}), wanted["experiment"])
        changed = _differences(_with_defaults(claimed), _with_defaults(wanted))
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
    ``out/metrics.json`` and returns it (or returns the one already there: delete it to re-evaluate), with
    ``seed``, the ``train.seed`` both models were trained with."""
    out = Path(out)
    _claim(out, experiment_config(shards, config, overrides, references))
    seed = load_config(config, overrides).train.seed
    if (out / "metrics.json").exists():
        print(f"reusing {out / 'metrics.json'}: {out / CONFIG_FILE} shows the same configuration "
              "(delete metrics.json to evaluate again)", flush=True)
        return {**json.loads((out / "metrics.json").read_text()), "seed": seed}  # older files lack it
    start = time.perf_counter()
    note_kept(f"experiment {out}", f"the finished stages in {out} (the same command continues from them)")
    shard_dir = out / "shards"
    if not (shard_dir / "manifest.json").exists():
        build_shards(dataclasses.replace(shards, out=str(shard_dir)))
    runs = {}
    for name, defense in (("baseline", "none"), ("mcci", "mcci")):
        runs[name] = _train_once(out / name, config, [*overrides, f"data.shards={shard_dir}", f"train.defense={defense}"])
    baseline = evaluate_checkpoint(runs["baseline"], str(shard_dir), num_workers=num_workers)
    mcci = evaluate_checkpoint(runs["mcci"], str(shard_dir), list(references), num_workers=num_workers)
    results = add_der(combine_results(baseline, mcci), baseline)
    results["audit"] = audit(runs["mcci"], str(shard_dir), out / "audit", num_workers=num_workers)
    results["seed"] = seed
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", results)
    return results


def _finished_experiment(out: Path, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The record of the finished experiment in ``out``, refused unless ``config`` and ``overrides`` are its own."""
    if not (out / "metrics.json").exists():
        raise JobError(f"{out} has no finished experiment (metrics.json): run the experiment before its variants")
    experiment = json.loads((out / CONFIG_FILE).read_text())  # as recorded: keys added since are not its own
    changed = _differences(_with_defaults(experiment)["config"], _training_config(config, overrides))
    if changed:
        raise JobError(f"{out} was trained with another configuration ({'; '.join(changed[:3])}): give its variants "
                       "the experiment's own config and overrides, and put what differs in the variant's")
    return experiment


def seed_baselines(out: str | Path) -> dict[int, dict[str, Any]]:
    """``train.seed`` -> the metrics of each undefended model ``run_baseline`` finished beside the experiment in
    ``out`` (not the experiment's own), by seed."""
    found = {}
    for path in sorted(Path(out, BASELINES).glob("seed*/metrics.json")):
        metrics = json.loads(path.read_text())
        found[metrics["seed"]] = metrics
    return dict(sorted(found.items()))


def run_baseline(out: str | Path, seed: int, config: str | None = None, overrides: list[str] = (),
                 num_workers: int = 0) -> dict[str, Any]:
    """The undefended model of the finished experiment in ``out`` (its ``config`` and ``overrides``), trained again
    with ``train.seed=seed`` on its shards: ``out/baselines/seed<seed>/metrics.json`` (its evaluation, with
    ``seed``), written and returned, or returned when there; for the experiment's own seed, the experiment's
    metrics. Like an experiment, a folder holding another configuration is refused and an interrupted run continues."""
    out = Path(out)
    experiment = _finished_experiment(out, config, overrides)
    if seed == load_config(config, overrides).train.seed:
        return json.loads((out / "metrics.json").read_text())
    folder = out / BASELINES / f"seed{seed}"
    _claim(folder, {"experiment": experiment, "baseline_seed": seed})
    if (folder / "metrics.json").exists():
        return json.loads((folder / "metrics.json").read_text())
    shard_dir = out / "shards"
    run_dir = _train_once(folder / "baseline", config, [*overrides, f"train.seed={seed}", f"data.shards={shard_dir}",
                                                        "train.defense=none"])
    results = {**evaluate_checkpoint(run_dir, str(shard_dir), num_workers=num_workers), "seed": seed}
    write_json(folder / "metrics.json", results)
    return results


def run_variant(out: str | Path, name: str, variant_overrides: list[str], config: str | None = None,
                overrides: list[str] = (), num_workers: int = 0) -> dict[str, Any]:
    """Another MCCI run beside the finished experiment in ``out`` (``run_experiment``'s, same ``config``
    and ``overrides``): its shards, its training config plus ``variant_overrides`` (an MCCI variant,
    another seed). Writes ``out/variants/<name>/metrics.json`` (both inference modes, the audit, ``seed``) and
    returns it, with DER against the undefended model of the run's own ``train.seed`` (``run_baseline``, which
    trains it when missing). A baseline evaluated on other shards than these is refused; like the experiment, a
    folder holding another configuration is refused and an interrupted run continues."""
    out = Path(out)
    fixed = [o for o in variant_overrides if o.split("=", 1)[0] in PER_RUN_KEYS]
    if fixed:
        raise JobError(f"variant {name!r} sets {', '.join(fixed)}: the experiment sets these per run "
                       f"({', '.join(PER_RUN_KEYS)}); leave them out")
    experiment = _finished_experiment(out, config, overrides)
    folder = out / "variants" / name
    _claim(folder, {"experiment": experiment, "variant": list(variant_overrides)})
    seed = load_config(config, [*overrides, *variant_overrides]).train.seed
    baseline = run_baseline(out, seed, config, overrides, num_workers)
    shard_dir = out / "shards"
    own_seed = seed == load_config(config, overrides).train.seed
    baseline_file = out / "metrics.json" if own_seed else out / BASELINES / f"seed{seed}" / "metrics.json"
    # before any training: hours spent on a run whose DER would compare other test images would be lost
    check_baseline_shards(baseline, fingerprint(load_manifest(str(shard_dir))), str(baseline_file), str(shard_dir),
                          f"delete {baseline_file} to evaluate the undefended model on these shards again")
    if (folder / "metrics.json").exists():
        # finished earlier: its DER is taken again (a run finished before baselines had seeds has it against the
        # experiment's seed), and written back so that the file and what is returned agree
        results = add_der({**json.loads((folder / "metrics.json").read_text()), "seed": seed}, baseline)
        write_json(folder / "metrics.json", results)
        return results
    start = time.perf_counter()
    run_dir = _train_once(folder / "mcci", config, [*overrides, *variant_overrides, f"data.shards={shard_dir}",
                                                    "train.defense=mcci"])
    results = add_der(evaluate_checkpoint(run_dir, str(shard_dir), num_workers=num_workers), baseline)
    results["audit"] = audit(run_dir, str(shard_dir), folder / "audit", num_workers=num_workers)
    results["seed"] = seed
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(folder / "metrics.json", results)
    return results


def _train_once(run_dir: Path, config: str | None, overrides: list[str]) -> Path:
    """Train into ``run_dir`` unless its model is saved there; a run that stopped part-way resumes."""
    if not (run_dir / "model").exists():
        print(f"== training {run_dir} ==", flush=True)
        resume = ["train.resume=true"] if run_dir.exists() else []
        train(load_config(config, [*overrides, f"train.out={run_dir}", *resume]))
    return run_dir
