"""Metrics files and the readable table printed after evaluation."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.support.metrics import defense_effectiveness_rating


def result_sets(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(weights kind, figures) for each weight set of an evaluation's JSON (``mcci eval --out``): ``by_weights``'s
    when it has them, else the one set it holds (files written before weights were named: ``raw``)."""
    if "by_weights" in results:
        return list(results["by_weights"].items())
    return [(results.get("weights", "raw"), results)]


def baseline_figures(baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    """weights kind -> the undefended model's CA / ASR / RA, from its evaluation's JSON (or bare figures: raw)."""
    if "baseline" not in baseline and "by_weights" not in baseline:
        return {"raw": baseline}
    return {kind: figures["baseline"] for kind, figures in result_sets(baseline) if "baseline" in figures}


def add_der(results: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Add DER to every MCCI mode and alternative reference of each weight set, against the undefended model's
    figures for the same weights (``baseline``: its evaluation's JSON); a set whose kind the baseline lacks gets no
    DER: comparing a defence's EMA with a baseline's raw weights (or the reverse) would credit the EMA."""
    base = baseline_figures(baseline)
    sets = result_sets(results) + ([(results.get("weights", "raw"), results)] if "by_weights" in results else [])
    for kind, figures in sets:
        if kind in base:
            for m in [*figures.get("mcci", {}).values(), *figures.get("references", {}).values()]:
                m["der"] = defense_effectiveness_rating(base[kind], m)
    return results


def combine_results(baseline: dict[str, Any], mcci: dict[str, Any]) -> dict[str, Any]:
    """One JSON of an undefended model's and an MCCI model's evaluations, weight set by weight set."""
    combined = {**baseline, **mcci}
    if "by_weights" in baseline or "by_weights" in mcci:
        kinds = dict.fromkeys([k for k, _ in result_sets(baseline)] + [k for k, _ in result_sets(mcci)])
        sets = [dict(result_sets(baseline)), dict(result_sets(mcci))]
        combined["by_weights"] = {k: {**sets[0].get(k, {}), **sets[1].get(k, {})} for k in kinds}
    return combined


def format_table(results: dict[str, Any]) -> str:
    """The readable table of an evaluation, one per weight set, each headed by its weights."""
    return "\n\n".join(f"{kind} weights:\n{_format_set(figures)}" for kind, figures in result_sets(results))


def _format_set(results: dict[str, Any]) -> str:
    rows = []
    if "baseline" in results:
        rows.append(("baseline (no defense)", results["baseline"]))
    for mode, label in (("own", "MCCI, own spectrum"), ("mind_control", "MCCI, mind control")):
        if mode in results.get("mcci", {}):
            rows.append((label, results["mcci"][mode]))
    for name, m in results.get("references", {}).items():
        rows.append((f"  mind control, ref {name}", m))
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'model':<{width}}  {'CA':>6}  {'ASR':>6}  {'RA':>6}  {'DER':>6}", "-" * (width + 32)]
    for name, m in rows:
        der = f"{m['der']:6.3f}" if "der" in m else f"{'':>6}"
        lines.append(f"{name:<{width}}  {m['clean_acc']:6.3f}  {m['asr']:6.3f}  {m['ra']:6.3f}  {der}")
    return "\n".join(lines)


def format_audit(summary: dict[str, Any]) -> str:
    """One line: how many samples `mcci audit` flagged and, where recorded, how many were poisoned."""
    line = f"audit: {summary['flagged']} of {summary['samples']} {summary['split']} samples flagged"
    truth = summary.get("recorded_poisoned")
    if truth:
        line += (f"; of the {truth['count']} recorded as poisoned, {truth['flagged']} flagged (precision "
                 f"{truth['precision']:.3f}, recall {truth['recall']:.3f}, AUROC {truth['auroc']:.3f})")
    return line


def write_text(path: str | Path, text: str) -> None:
    """Atomic: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1))
