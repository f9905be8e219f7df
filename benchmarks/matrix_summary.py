"""The defense matrix as it stands on disk: every attack, MCCI and every variant that has been run.

    python -m benchmarks.matrix_summary --matrix runs/defense-matrix-cifar10 [--out summary.json]

``benchmarks.defense_matrix`` tables the attacks and variants of one command; experiments grow over many
commands (a variant here, seeds there). This reads every finished run under ``--matrix`` (each attack's
``metrics.json`` and its ``variants/NAME[-seedN]/metrics.json``; ``NAME-seedN`` runs are seeds of ``NAME``,
``mcci-seedN`` seeds of plain MCCI) and writes, beside it, three pivot tables (attack x model: mind-control
ASR, RA, and clean accuracy less the undefended model's, mean ± standard deviation over seeds, the seed count
in brackets, "-" where not run) to ``matrix_summary.md``, a heat map of the ASR table to ``matrix_summary.png``,
and every run's figures to the JSON result. Nothing is trained.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from benchmarks.common import write_result
from benchmarks.defense_matrix import ATTACK_FAILED, cell, verdict
from pipeline.support.plots import plt, save_figure

SEED_SUFFIX = "-seed"


def run_group(run_name: str) -> str:
    """``abl8-seed2`` -> ``abl8``; a name without a numeric seed suffix is its own group."""
    name, suffix, seed = run_name.rpartition(SEED_SUFFIX)
    return name if suffix and seed.isdigit() else run_name


def _run_order(run_name: str) -> tuple[str, int]:
    """Within a group: the unseeded run first, then by seed as a number (seed10 after seed2)."""
    group = run_group(run_name)
    return group, -1 if group == run_name else int(run_name.rpartition(SEED_SUFFIX)[2])


def _saved_model_section(run_folder: Path) -> dict[str, Any] | None:
    config = run_folder / "mcci" / "model" / "config.yaml"
    return yaml.safe_load(config.read_text())["model"] if config.is_file() else None


def _check_same_model(folder: Path, group: str, run_folders: list[Path]) -> None:
    """Seeds of one variant must be one model: a rule that changed between runs (the AIN's size rule did) would
    otherwise average two designs under one name. Runs without a saved config are not compared."""
    sections = {f.name: s for f in run_folders if (s := _saved_model_section(f)) is not None}
    if len({yaml.safe_dump(s, sort_keys=True) for s in sections.values()}) > 1:
        differing = sorted({k for s in sections.values() for k, v in s.items()
                            if any(other.get(k) != v for other in sections.values())})
        raise SystemExit(f"{folder}: the runs of {group!r} ({', '.join(sections)}) were trained with different model "
                         f"settings ({', '.join(differing)}); rename the odd runs' folders or train them again")


def collected_rows(matrix: str | Path) -> list[dict[str, Any]]:
    """One row per finished attack experiment under ``matrix``, in the shape ``defense_matrix`` tables:
    the experiment's metrics, ``mcci_seeds`` and ``variants`` (name -> runs, the unseeded run first, then by
    seed; a group of seeded runs only, e.g. ``abl8-seed1`` alone, is shown as that group)."""
    rows = []
    for folder in sorted(p for p in Path(matrix).iterdir() if (p / "metrics.json").is_file()):
        shards = json.loads((folder / "experiment.json").read_text())["shards"]
        mode = shards.get("mode", "all-to-one")
        row = {"attack": shards["attack"] + ("" if mode == "all-to-one" else f":{mode}"),
               "poison_rate": shards["poison_rate"], "attack_params": shards.get("attack_params", {}),
               **json.loads((folder / "metrics.json").read_text())}
        run_folders: dict[str, list[Path]] = {"mcci": [folder]}
        for path in sorted((folder / "variants").glob("*/metrics.json"), key=lambda p: _run_order(p.parent.name)):
            run_folders.setdefault(run_group(path.parent.name), []).append(path.parent)
        for group, runs in run_folders.items():
            _check_same_model(folder, group, runs)
        groups = {group: [json.loads((f / "metrics.json").read_text()) for f in runs]
                  for group, runs in run_folders.items()}
        row["mcci_seeds"] = groups.pop("mcci")[1:]
        row["variants"] = groups
        row["verdict"] = verdict(row)
        rows.append(row)
    if not rows:
        raise SystemExit(f"{matrix}: no finished attack experiment (no <attack>/metrics.json); run "
                         "benchmarks.defense_matrix --out there first")
    return rows


def model_runs(row: dict[str, Any]) -> dict[str, list[dict]]:
    """Model name -> its runs' mind-control metrics: plain MCCI (every seed), then each variant."""
    runs = {"MCCI": [m["mcci"]["mind_control"] for m in [row, *row["mcci_seeds"]]]}
    runs.update({name: [m["mcci"]["mind_control"] for m in group] for name, group in row["variants"].items()})
    return runs


def pivot(rows: list[dict[str, Any]], models: list[str], value: Callable[[dict, dict], float],
          signed: bool = False) -> list[list[str]]:
    """Cells ``value(row, run metrics)`` per attack and model: mean ± sd (n seeds), "-" where not run."""
    def shown(row: dict, runs: list[dict]) -> str:
        return cell([value(row, m) for m in runs], signed) + (f" ({len(runs)})" if len(runs) > 1 else "")

    return [[shown(row, runs[name]) if name in runs else "-" for name in models]
            for row, runs in ((row, model_runs(row)) for row in rows)]


def variant_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every variant run on some attack, the most widely run first (then by name)."""
    names = {name for r in rows for name in r["variants"]}
    return sorted(names, key=lambda n: (-sum(n in r["variants"] for r in rows), n))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The three pivot tables, each under a line saying what it holds."""
    models = ["MCCI", *variant_names(rows)]
    attack_cells = [f"{r['attack']} ({r['baseline']['clean_acc']:.3f} / {r['baseline']['asr']:.3f}"
                    f"{', ' + ATTACK_FAILED if r['verdict'] == ATTACK_FAILED else ''})" for r in rows]
    header = "| attack (undefended CA / ASR) | " + " | ".join(models) + " |\n|" + " --- |" * (len(models) + 1)
    sections = []
    for title, value, signed in (
            ("Mind-control ASR", lambda r, m: m["asr"], False),
            ("Mind-control RA", lambda r, m: m["ra"], False),
            ("Mind-control CA less the undefended CA", lambda r, m: m["clean_acc"] - r["baseline"]["clean_acc"], True)):
        body = "\n".join(f"| {a} | " + " | ".join(cells) + " |"
                         for a, cells in zip(attack_cells, pivot(rows, models, value, signed)))
        sections.append(f"{title} (mean ± sd over seeds, the count in brackets; - : not run)\n\n{header}\n{body}")
    return "\n\n".join(sections) + "\n"


def asr_heatmap(rows: list[dict[str, Any]]) -> plt.Figure:
    """Mind-control ASR per attack (rows, undefended first) and model (columns), mean over seeds; grey: not run."""
    models = ["undefended", "MCCI", *variant_names(rows)]
    grid = np.full((len(rows), len(models)), np.nan)
    for i, row in enumerate(rows):
        runs = model_runs(row)
        grid[i, 0] = row["baseline"]["asr"]
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
