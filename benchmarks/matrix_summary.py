"""The defense matrix as it stands on disk: every attack, MCCI and every variant that has been run.

    python -m benchmarks.matrix_summary --matrix runs/defense-matrix-cifar10 [--out summary.json]

``benchmarks.defense_matrix`` tables the attacks and variants of one command; experiments grow over many
commands (a variant here, seeds there). This reads every finished run under ``--matrix`` (each attack's
``metrics.json``, its ``variants/NAME[-seedN]/metrics.json`` and the undefended model's other seeds,
``baselines/seedN/metrics.json``; ``NAME-seedN`` runs are seeds of ``NAME``, ``mcci-seedN`` seeds of plain MCCI)
and writes, beside it, three pivot tables (attack x model: mind-control ASR, RA, and clean accuracy less that of
the undefended model of the same seed, mean ± standard deviation over seeds, the seed count in brackets, "-"
where not run) to ``matrix_summary.md``, a heat map of the ASR table to ``matrix_summary.png``, and every run's
figures to the JSON result. Nothing is trained.

The runs averaged as one model's seeds must be that: each run's saved config is read, and a group whose runs
differ in anything but ``train.seed`` (and where they were written), or two of whose runs share a seed, or a
``-seedN`` run trained with another seed, is refused, naming the runs and what differs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from benchmarks.common import write_result
from benchmarks.defense_matrix import ATTACK_FAILED, baselines, cell, verdict
from pipeline.components.run_checks import DEFAULTS
from pipeline.jobs.experiment import BASELINES, PER_RUN_KEYS
from pipeline.support.plots import plt, save_figure

SEED_SUFFIX = "-seed"
# what may differ between the seeds of one model: the seed, and where each run was written and read from
NOT_CONFIGURATION = ("train.seed", *PER_RUN_KEYS)


def run_group(run_name: str) -> str:
    """``abl8-seed2`` -> ``abl8``; a name without a numeric seed suffix is its own group."""
    name, suffix, seed = run_name.rpartition(SEED_SUFFIX)
    return name if suffix and seed.isdigit() else run_name


def _run_order(run_name: str) -> tuple[str, int]:
    """Within a group: the unseeded run first, then by seed as a number (seed10 after seed2)."""
    group = run_group(run_name)
    return group, -1 if group == run_name else int(run_name.rpartition(SEED_SUFFIX)[2])


def _flat(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in section.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def saved_config(trained: Path) -> dict[str, Any]:
    """The flattened training config a run's model was saved with (``trained``: its ``train.out``), with the keys
    added since it was written at their defaults (they did not exist: the run had their default behaviour)."""
    path = trained / "model" / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"{path} is missing, so {trained} cannot be checked to be the same configuration as the "
                         "other seeds it would be averaged with; restore the run's model folder or move the run away")
    return {**DEFAULTS, **_flat(yaml.safe_load(path.read_text()))}


def check_seeds_of_one_model(folder: Path, group: str, configs: dict[str, dict[str, Any]]) -> None:
    """Refuse averaging ``configs`` (run name -> ``saved_config``) as the seeds of ``group``: they must differ in
    ``train.seed`` and nothing else of their configuration, and a ``NAME-seedN`` run must have been trained with N."""
    named = {n: int(n.rpartition(SEED_SUFFIX)[2]) for n in configs if run_group(n) != n}
    wrong = [f"{n} has train.seed={configs[n]['train.seed']}" for n, s in named.items() if configs[n]["train.seed"] != s]
    if wrong:
        raise SystemExit(f"{folder}: {'; '.join(wrong)}; its name says another seed: rename the run's folder "
                         "after its seed")
    by_seed: dict[int, list[str]] = {}
    for name, config in configs.items():
        by_seed.setdefault(config["train.seed"], []).append(name)
    twice = [" and ".join(names) + f" have train.seed={seed}" for seed, names in by_seed.items() if len(names) > 1]
    if twice:
        raise SystemExit(f"{folder}: of the runs of {group!r}, {'; '.join(twice)}: one seed would be counted as "
                         "several; delete or rename all but one")
    compared = [{k: v for k, v in c.items() if k not in NOT_CONFIGURATION} for c in configs.values()]
    differing = sorted({k for c in compared for k in c if any(other.get(k) != c[k] for other in compared)})
    if differing:
        raise SystemExit(f"{folder}: the runs of {group!r} ({', '.join(configs)}) were trained with different "
                         f"settings ({', '.join(differing)}), so they are not seeds of one model; rename the odd runs' "
                         "folders or train them again")


def _seeded(metrics_path: Path, trained: Path) -> dict[str, Any]:
    """A run's metrics, with the seed its saved config records (files written before metrics held it lack it)."""
    return {**json.loads(metrics_path.read_text()), "seed": saved_config(trained)["train.seed"]}


def collected_rows(matrix: str | Path) -> list[dict[str, Any]]:
    """One row per finished attack experiment under ``matrix``, in the shape ``defense_matrix`` tables:
    the experiment's metrics (with its ``seed``), ``baseline_seeds`` (the undefended model's other seeds),
    ``mcci_seeds`` and ``variants`` (name -> runs, the unseeded run first, then by seed; a group of seeded runs
    only, e.g. ``abl8-seed1`` alone, is shown as that group), each group checked to be one model's seeds."""
    rows = []
    for folder in sorted(p for p in Path(matrix).iterdir() if (p / "metrics.json").is_file()):
        shards = json.loads((folder / "experiment.json").read_text())["shards"]
        mode = shards.get("mode", "all-to-one")
        row = {"attack": shards["attack"] + ("" if mode == "all-to-one" else f":{mode}"),
               "poison_rate": shards["poison_rate"], "attack_params": shards.get("attack_params", {}),
               **_seeded(folder / "metrics.json", folder / "mcci")}
        trained: dict[str, dict[str, Path]] = {"mcci": {"mcci": folder / "mcci"}}
        for path in sorted((folder / "variants").glob("*/metrics.json"), key=lambda p: _run_order(p.parent.name)):
            trained.setdefault(run_group(path.parent.name), {})[path.parent.name] = path.parent / "mcci"
        undefended = {"baseline": folder / "baseline"}  # baselines/seedN: named baseline-seedN, so its N is checked
        for path in sorted((folder / BASELINES).glob("seed*/metrics.json"),
                           key=lambda p: _run_order(f"baseline-{p.parent.name}")):
            undefended[f"baseline-{path.parent.name}"] = path.parent / "baseline"
        for group, runs in [*trained.items(), ("the undefended model", undefended)]:
            check_seeds_of_one_model(folder, group, {name: saved_config(run) for name, run in runs.items()})
        groups = {group: [_seeded(run.parent / "metrics.json", run) for run in runs.values()]
                  for group, runs in trained.items()}
        row["mcci_seeds"] = groups.pop("mcci")[1:]
        row["variants"] = groups
        row["baseline_seeds"] = [_seeded(run.parent / "metrics.json", run) for run in list(undefended.values())[1:]]
        row["verdict"] = verdict(row)
        rows.append(row)
    if not rows:
        raise SystemExit(f"{matrix}: no finished attack experiment (no <attack>/metrics.json); run "
                         "benchmarks.defense_matrix --out there first")
    return rows


def model_runs(row: dict[str, Any]) -> dict[str, list[dict]]:
    """Model name -> its runs' mind-control metrics, each with its run's ``seed``: plain MCCI (every seed), then
    each variant."""
    def mind_control(group: list[dict]) -> list[dict]:
        return [{**m["mcci"]["mind_control"], "seed": m["seed"]} for m in group]

    return {"MCCI": mind_control([row, *row["mcci_seeds"]]),
            **{name: mind_control(group) for name, group in row["variants"].items()}}


def pivot(rows: list[dict[str, Any]], models: list[str], value: Callable[[dict, dict], float | None],
          signed: bool = False) -> list[list[str]]:
    """Cells ``value(row, run metrics)`` per attack and model: mean ± sd (n seeds), "-" where not run; where
    ``value`` is None for some runs (no undefended model of their seed to pair them with), the seeds lacking one."""
    def shown(row: dict, runs: list[dict]) -> str:
        values = [value(row, m) for m in runs]
        unpaired = [str(m["seed"]) for m, v in zip(runs, values) if v is None]
        if unpaired:
            return f"no undefended seed {', '.join(unpaired)}"
        return cell(values, signed) + (f" ({len(runs)})" if len(runs) > 1 else "")

    return [[shown(row, runs[name]) if name in runs else "-" for name in models]
            for row, runs in ((row, model_runs(row)) for row in rows)]


def ca_less_undefended(row: dict[str, Any], run: dict[str, Any]) -> float | None:
    """A run's clean accuracy less that of the undefended model of its seed (None where that seed has none):
    averaged over seeds, a difference against one baseline seed would carry that seed's luck into every cell."""
    undefended = baselines(row).get(run["seed"])
    return None if undefended is None else run["clean_acc"] - undefended["clean_acc"]


def variant_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every variant run on some attack, the most widely run first (then by name)."""
    names = {name for r in rows for name in r["variants"]}
    return sorted(names, key=lambda n: (-sum(n in r["variants"] for r in rows), n))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The three pivot tables, each under a line saying what it holds."""
    models = ["MCCI", *variant_names(rows)]
    attack_cells = [f"{r['attack']} (" + " / ".join(cell([b[k] for b in baselines(r).values()]) for k in ("clean_acc", "asr"))
                    + (f", {len(baselines(r))} seeds" if len(baselines(r)) > 1 else "")
                    + f"{', ' + ATTACK_FAILED if r['verdict'] == ATTACK_FAILED else ''})" for r in rows]
    header = "| attack (undefended CA / ASR) | " + " | ".join(models) + " |\n|" + " --- |" * (len(models) + 1)
    sections = []
    for title, value, signed in (
            ("Mind-control ASR", lambda r, m: m["asr"], False),
            ("Mind-control RA", lambda r, m: m["ra"], False),
            ("Mind-control CA less the undefended CA of the same seed", ca_less_undefended, True)):
        body = "\n".join(f"| {a} | " + " | ".join(cells) + " |"
                         for a, cells in zip(attack_cells, pivot(rows, models, value, signed)))
        sections.append(f"{title} (mean ± sd over seeds, the count in brackets; - : not run)\n\n{header}\n{body}")
    return "\n\n".join(sections) + "\n"


def asr_heatmap(rows: list[dict[str, Any]]) -> plt.Figure:
    """Mind-control ASR per attack (rows) and model (columns, the undefended model's ASR first), mean over seeds;
    grey: not run."""
    models = ["undefended", "MCCI", *variant_names(rows)]
    grid = np.full((len(rows), len(models)), np.nan)
    for i, row in enumerate(rows):
        runs = model_runs(row)
        grid[i, 0] = np.mean([b["asr"] for b in baselines(row).values()])
        for j, name in enumerate(models[1:], start=1):
            if name in runs:
                grid[i, j] = np.mean([m["asr"] for m in runs[name]])
    fig, ax = plt.subplots(figsize=(0.6 * len(models) + 2.5, 0.4 * len(rows) + 1.6), constrained_layout=True)
    ax.set_facecolor("0.9")  # not run
    image = ax.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(models)), models, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["attack"] + (" (failed on the baseline)" if r["verdict"] == ATTACK_FAILED else "")
                                     for r in rows], fontsize=8)
    ax.set_title("attack success rate (mind control; undefended in the first column)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", required=True, help="the --out folder of benchmarks.defense_matrix")
    parser.add_argument("--out", help="the JSON result (default: <matrix>/matrix_summary.json)")
    args = parser.parse_args()
    matrix = Path(args.matrix)
    if not matrix.is_dir():
        raise SystemExit(f"{matrix}: no such folder; give the --out folder of benchmarks.defense_matrix")
    rows = collected_rows(matrix)
    text = markdown(rows)
    print(text)
    (matrix / "matrix_summary.md").write_text(text)
    save_figure(asr_heatmap(rows), matrix / "matrix_summary.png")
    write_result("matrix_summary", {"matrix": str(matrix), "rows": rows}, args.out or str(matrix / "matrix_summary.json"))


if __name__ == "__main__":
    main()
