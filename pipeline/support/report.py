"""Metrics files and the readable table printed after evaluation."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.support.metrics import defense_effectiveness_rating


def add_der(results: dict[str, Any], baseline: dict[str, float]) -> dict[str, Any]:
    """Add DER against ``baseline`` to every MCCI mode and every alternative reference."""
    for m in [*results.get("mcci", {}).values(), *results.get("references", {}).values()]:
        m["der"] = defense_effectiveness_rating(baseline, m)
    return results


def format_table(results: dict[str, Any]) -> str:
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
