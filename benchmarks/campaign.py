"""A campaign: a plan's attacks x models x seeds, run as cells in parallel processes (within a deadline if given), one
JSON per finished cell, resumable across short GPU windows.

    python -m benchmarks.campaign configs/campaigns/imagenette224.yaml --out runs/campaign \\
        --data-root ../shared/data/imagenette --deadline-s 480 --parallel 4

A cell is one model trained on one attack's shards (``mcci train``, validated every epoch on the raw weights and the
EMA's) and then scored (``mcci eval --weights both``); its JSON (``cells/<attack>--<model>--s<seed>.json``) holds the
command lines, the commit, the machine, the settings, the per-epoch figures and the final figures of each weight set.
Shards are built once per attack. A finished cell is skipped when the campaign runs again; a cell cut off by the
deadline resumes from its newest checkpoint (``train.resume=true``); no cell is started that the time left cannot
hold (its estimate: the plan's ``cell_seconds``, then the mean of the cells finished). ``campaign.json`` tables every
finished cell with DER against the undefended model of the same attack, seed and weights; the cells' JSON and the logs
are packed into ``results.tar.gz``: a GPU window brings back few files.

The plan (YAML)::

    build: {source: train, test_source: val, image_size: 224, max_train: 2500, max_test: 1000, trusted_count: 100}
    config: configs/imagenette_efficientnet_lite0.yaml
    overrides: [train.epochs=8]
    attacks: {badnets: {attack: badnets, target: 3}, sig: {attack: sig, target: 5, poison_rate: 0.05}}
    models: {undefended: [train.defense=none], mcci: [], residual: [train.mcci_variant=residual]}
    seeds: [0]
    cell_seconds: 60
    chosen_on: "which split chose the settings"

Sources are paths relative to ``--data-root`` (or absolute). Attack entries take ``attack``, ``target``,
``poison_rate`` (default 0.1), ``mode`` and ``params`` (``--param``s; a relative ``*_file`` is read from the plan's
folder).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ROOT, machine
from pipeline.components.evaluation import PART_FIGURES
from pipeline.components.validation import VAL_LOG
from pipeline.support.metrics import defense_effectiveness_rating
from pipeline.support.report import result_sets, write_json

PLAN_KEYS = {"build", "config", "overrides", "attacks", "models", "seeds", "cell_seconds", "chosen_on", "notes"}
ATTACK_KEYS = {"attack", "target", "poison_rate", "mode", "params"}
UNDEFENDED = "train.defense=none"
# the mcci command as this interpreter runs it, so a campaign needs no installed entry point
MCCI = [sys.executable, "-m", "pipeline.cli"]


class PlanError(ValueError):
    pass


@dataclass
class Cell:
    attack: str
    model: str
    seed: int
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{self.attack}--{self.model}--s{self.seed}"

    @property
    def undefended(self) -> bool:
        return UNDEFENDED in self.overrides


@dataclass
class Campaign:
    plan: dict[str, Any]
    plan_dir: Path
    out: Path
    data_root: Path
    deadline: float  # time.monotonic() at which every process must be gone (inf: none)
    parallel: int
    extra: list[str] = field(default_factory=list)  # overrides for every cell (e.g. train.mixed_precision=bf16)
    finished_seconds: list[float] = field(default_factory=list)
    processes: set[subprocess.Popen] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cells(self) -> list[Cell]:
        """In the plan's model order (its priority: what a short window must not lose comes first), then seed by
        seed, attack by attack."""
        return [Cell(attack, model, seed, [*overrides, f"train.seed={seed}"])
                for model, overrides in self.plan["models"].items() for seed in self.plan.get("seeds", [0])
                for attack in self.plan["attacks"]]

    def estimate(self) -> float:
        done = self.finished_seconds
        return sum(done) / len(done) if done else float(self.plan.get("cell_seconds", 60))

    def left(self) -> float:
        return self.deadline - time.monotonic()


def load_plan(path: str | Path) -> dict[str, Any]:
    return check_plan(yaml.safe_load(Path(path).read_text()), path)


def check_plan(plan: Any, path: str | Path) -> dict[str, Any]:
    if not isinstance(plan, dict):
        raise PlanError(f"{path} must hold a mapping (build, config, overrides, attacks, models, seeds)")
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise PlanError(f"{path}: unknown keys {sorted(unknown)}; a plan takes {sorted(PLAN_KEYS)}")
    for key in ("build", "attacks", "models"):
        if not isinstance(plan.get(key), dict) or not plan[key]:
            raise PlanError(f"{path}: '{key}' must be a non-empty mapping")
    for name, spec in plan["attacks"].items():
        if not isinstance(spec, dict) or "attack" not in spec or set(spec) - ATTACK_KEYS:
            raise PlanError(f"{path}: attack {name!r} needs 'attack' and takes only {sorted(ATTACK_KEYS)}")
    for name, overrides in plan["models"].items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise PlanError(f"{path}: model {name!r} must be a list of KEY=VALUE training overrides")
        if "--" in name:
            raise PlanError(f"{path}: model {name!r}: '--' separates a cell's name parts")
    return plan


def select(plan: dict[str, Any], *, attacks: str | None = None, models: str | None = None) -> dict[str, Any]:
    """``plan`` narrowed to the named attacks and models (comma-separated; None keeps all); an unknown name is an
    error naming the plan's own."""
    plan = dict(plan)
    for key, names in (("attacks", attacks), ("models", models)):
        if names is None:
            continue
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in plan[key]]
        if unknown or not wanted:
            raise PlanError(f"--{key} {names!r}: the plan's {key} are {', '.join(plan[key])}")
        plan[key] = {n: plan[key][n] for n in wanted}
    return plan


def set_keys(plan: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    """``plan`` with each dotted ``KEY=VALUE`` (a YAML value) set; the result is checked as a plan file is."""
    for text in settings:
        key, equals, value = text.partition("=")
        if not equals:
            raise PlanError(f"--set {text!r} must look like KEY=VALUE, e.g. build.max_train=60")
        *path, last = key.split(".")
        node = plan
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PlanError(f"--set {key}: {part} is not a mapping in the plan")
        node[last] = yaml.safe_load(value)
    return check_plan(plan, "the plan")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MCCI_COMMIT", "unknown")


def run_logged(campaign: Campaign, command: list[str], log: Path) -> int:
    """Run ``command`` (a new session, so the deadline can stop all of it) with its output in ``log``; killed at the
    campaign's deadline (returns -9 then)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with campaign.lock:
            campaign.processes.add(process)
        try:
            left = campaign.left()
            return process.wait(timeout=None if left == math.inf else max(left, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            out.write(f"\n[campaign] stopped at the deadline\n")
            return -9
        finally:
            with campaign.lock:
                campaign.processes.discard(process)


def source_path(campaign: Campaign, value: str | None) -> str | None:
    if value is None or "://" in value or value.startswith("embedded:"):
        return value
    return str(campaign.data_root / value)


def build_command(campaign: Campaign, attack: str) -> list[str]:
    spec, build = campaign.plan["attacks"][attack], campaign.plan["build"]
    command = [*MCCI, "shards", "build", "--source", source_path(campaign, build["source"]),
               "--attack", spec["attack"], "--target", str(spec.get("target", 0)),
               "--poison-rate", str(spec.get("poison_rate", 0.1)), "--mode", spec.get("mode", "all-to-one"),
               "--out", str(campaign.out / "shards" / attack), "--seed", str(build.get("seed", 0))]
    if build.get("test_source"):
        command += ["--test-source", source_path(campaign, build["test_source"])]
    for key in ("image_size", "max_train", "max_test", "trusted_count", "workers", "shard_size", "jpeg_quality"):
        if key in build:
            command += [f"--{key.replace('_', '-')}", str(build[key])]
    for key, value in (spec.get("params") or {}).items():
        if key.endswith("_file") and not Path(str(value)).is_absolute():
            value = campaign.plan_dir / str(value)
        command += ["--param", f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"]
    return command


def build_shards(campaign: Campaign, attack: str) -> bool:
    """The attack's shards, unless built already; False when the build failed."""
    if (campaign.out / "shards" / attack / "manifest.json").exists():
        return True
    log = campaign.out / "logs" / f"shards--{attack}.log"
    status = run_logged(campaign, build_command(campaign, attack), log)
    if status == -9:
        print(f"[campaign] shards {attack}: stopped at the deadline (--deadline-s), nothing kept; run again with a "
              "later one", flush=True)
    else:
        print(f"[campaign] shards {attack}: {'built' if status == 0 else 'FAILED, see ' + str(log)}", flush=True)
    return status == 0


def train_command(campaign: Campaign, cell: Cell) -> list[str]:
    run = campaign.out / "runs" / cell.name
    config = campaign.plan.get("config")
    resume = ["train.resume=true"] if (run / "checkpoints").is_dir() else []
    return [*MCCI, "train", *(["--config", str(ROOT / config)] if config else []),
            *campaign.plan.get("overrides", []), *campaign.extra, *cell.overrides,
            f"data.shards={campaign.out / 'shards' / cell.attack}", f"train.out={run}", *resume]


def eval_command(campaign: Campaign, cell: Cell) -> list[str]:
    run = campaign.out / "runs" / cell.name
    return [*MCCI, "eval", "--checkpoint", str(run), "--shards", str(campaign.out / "shards" / cell.attack),
            "--out", str(run / "eval.json")]


def epoch_rows(run: Path) -> list[dict[str, Any]]:
    path = run / VAL_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_cell(campaign: Campaign, cell: Cell) -> str:
    """Train and score one cell; write its JSON. Returns what became of it."""
    path = campaign.out / "cells" / f"{cell.name}.json"
    if path.exists():
        return "done before"
    if campaign.left() < campaign.estimate():
        return "not started: the time left cannot hold it"
    start = time.monotonic()
    log = campaign.out / "logs" / f"{cell.name}.log"
    run = campaign.out / "runs" / cell.name
    commands = []
    if not (run / "model").exists():
        commands.append(train_command(campaign, cell))
        if run_logged(campaign, commands[-1], log) != 0:
            return f"training stopped (deadline or error): {log}"
    commands.append(eval_command(campaign, cell))
    if run_logged(campaign, commands[-1], log) != 0:
        return f"evaluation stopped (deadline or error): {log}"
    seconds = time.monotonic() - start
    evaluation = json.loads((run / "eval.json").read_text())
    write_json(path, {
        "cell": cell.name, "attack": cell.attack, "attack_spec": campaign.plan["attacks"][cell.attack],
        "model": cell.model, "seed": cell.seed, "overrides": [*campaign.plan.get("overrides", []), *campaign.extra,
                                                              *cell.overrides],
        "config": campaign.plan.get("config"), "build": campaign.plan["build"],
        "chosen_on": campaign.plan.get("chosen_on", ""), "commands": [shlex.join(c) for c in commands],
        "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1),
        "epochs": epoch_rows(run), "final": {kind: figures for kind, figures in result_sets(evaluation)}})
    with campaign.lock:
        campaign.finished_seconds.append(seconds)
    return f"done in {seconds:.0f} s"


def summary(campaign: Campaign) -> dict[str, Any]:
    """Every finished cell's final figures (mind control for MCCI models), with DER against the same attack's,
    seed's and weights' undefended cell."""
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((campaign.out / "cells").glob("*.json"))}
    rows = []
    for record in cells.values():
        for kind, figures in record["final"].items():
            mode = "baseline" if "baseline" in figures else "mind_control"
            m = figures["baseline"] if mode == "baseline" else figures["mcci"]["mind_control"]
            row = {"attack": record["attack"], "model": record["model"], "seed": record["seed"], "weights": kind,
                   "mode": mode, **{k: m[k] for k in ("clean_acc", "asr", "ra")}}
            base = next((c for c in cells.values() if c["attack"] == record["attack"] and c["seed"] == record["seed"]
                         and UNDEFENDED in c["overrides"] and kind in c["final"]), None)
            if base is not None and mode != "baseline":
                row["der"] = round(defense_effectiveness_rating(base["final"][kind]["baseline"], m), 4)
            rows.append(row)
    return {"plan": campaign.plan, "machine": machine(), "commit": commit(), "cells": sorted(cells), "rows": rows,
            "curves": curves(cells.values())}


def curves(cells) -> list[dict[str, Any]]:
    """Each cell's validation after every epoch, of each weight set, in the mode it is judged by (mind control for
    MCCI models, the plain prediction for undefended ones): whether a defence holds to the last epoch. An MCCI row
    also carries where each half of the head put the triggered inputs that epoch (``PART_FIGURES``, logged with
    the model's own mode): why it holds or not."""
    rows = []
    for record in cells:
        own = {(r["epoch"], r["weights"]): r for r in record["epochs"] if r.get("mode") == "own"}
        for row in record["epochs"]:
            if row.get("mode") in ("plain", "mind_control"):
                parts = own.get((row["epoch"], row["weights"]), {})
                rows.append({"attack": record["attack"], "model": record["model"], "seed": record["seed"],
                             **{k: row[k] for k in ("epoch", "weights", "mode", "clean_acc", "asr", "ra")},
                             **{k: parts[k] for k in PART_FIGURES if k in parts}})
    return rows


def pack_results(campaign: Campaign) -> Path:
    """Every finished cell's JSON, the logs, and each run's training and validation logs in one archive."""
    archive = campaign.out / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((campaign.out / "cells").glob("*.json")):
            tar.add(path, arcname=f"cells/{path.name}")
        for path in sorted((campaign.out / "logs").glob("*.log")):
            tar.add(path, arcname=f"logs/{path.name}")
        for run in sorted((campaign.out / "runs").glob("*")):
            for name in ("train_log.jsonl", VAL_LOG, "isolation.json", "eval.json"):
                if (run / name).exists():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    return archive


def run_campaign(campaign: Campaign) -> dict[str, Any]:
    """Shards first (their cells wait for them), then cells, ``parallel`` at a time, until done or the deadline."""
    outcomes: dict[str, str] = {}
    attacks = list(campaign.plan["attacks"])
    with ThreadPoolExecutor(max_workers=campaign.parallel) as pool:
        builds = {attack: pool.submit(build_shards, campaign, attack) for attack in attacks}
        pending: dict[Future, Cell] = {}
        queue = campaign.cells()
        while queue or pending:
            # a cell goes in when its shards are built and a slot is free; cells of a failed build are skipped
            while queue and len(pending) < campaign.parallel:
                ready = next((c for c in queue if builds[c.attack].done()), None)
                if ready is None:
                    break
                queue.remove(ready)
                if not builds[ready.attack].result():
                    outcomes[ready.name] = "not started: its shards did not build"
                    continue
                pending[pool.submit(run_cell, campaign, ready)] = ready
            if not pending:
                wait(list(builds.values()), return_when=FIRST_COMPLETED, timeout=1)
                continue
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED, timeout=1)
            for future in done:
                cell = pending.pop(future)
                outcomes[cell.name] = future.result()
                print(f"[campaign] {cell.name}: {outcomes[cell.name]} ({campaign.left():.0f} s left)", flush=True)
    result = {**summary(campaign), "outcomes": outcomes}
    write_json(campaign.out / "campaign.json", result)
    pack_results(campaign)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", help="the plan (YAML)")
    parser.add_argument("--out", required=True, help="the campaign folder (shards, runs, cells, logs)")
    parser.add_argument("--data-root", default=".", help="folder the plan's sources are relative to")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds after which no process runs on (a GPU window's length); default: none")
    parser.add_argument("--parallel", type=int, default=2, help="cells (and shard builds) at a time")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the plan, e.g. --set build.max_train=60 --set attacks.issba.params.steps=10 "
                             "--set attacks.issba.params.min_bit_accuracy=0 (a trial at tiny scale of the plan a GPU "
                             "window will run: an encoder trained 10 steps reads no code, which is otherwise refused)")
    parser.add_argument("--attacks", help="run only these of the plan's attacks (comma-separated)")
    parser.add_argument("--models", help="run only these of the plan's models (comma-separated)")
    parser.add_argument("overrides", nargs="*", help="training overrides for every cell (e.g. train.cpu=true)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options
    try:
        plan = select(set_keys(load_plan(args.plan), args.set), attacks=args.attacks, models=args.models)
    except (OSError, yaml.YAMLError, PlanError) as e:
        parser.error(str(e))
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    campaign = Campaign(plan=plan, plan_dir=Path(args.plan).resolve().parent, out=out.resolve(),
                        data_root=Path(args.data_root).resolve(),
                        deadline=time.monotonic() + (math.inf if args.deadline_s is None else args.deadline_s),
                        parallel=args.parallel, extra=args.overrides)
    result = run_campaign(campaign)
    for row in result["rows"]:
        der = f" DER {row['der']:.3f}" if "der" in row else ""
        print(f"{row['attack']:>10} {row['model']:>12} s{row['seed']} {row['weights']:>3} {row['mode']:>12}: "
              f"CA {row['clean_acc']:.3f} ASR {row['asr']:.3f} RA {row['ra']:.3f}{der}")
    unfinished = {k: v for k, v in result["outcomes"].items() if not v.startswith("done")}
    print(f"[campaign] {len(result['cells'])} cells finished; {len(unfinished)} not: "
          + "; ".join(f"{k}: {v}" for k, v in unfinished.items()), flush=True)


if __name__ == "__main__":
    main()
