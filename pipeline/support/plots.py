"""Figures: training curves, the defense matrix, and the one way every PNG here is written.

Each figure is built by a ``*_figure`` function, which tests read back (what is drawn), and written
by the ``plot_*`` function beside it.

Matplotlib runs headless (Agg): cluster nodes have no display. Every figure is written to a
temporary file and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_CURVES = "train_curves.png"
VAL_CURVES = "val_curves.png"


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def training_log_figure(records: list[dict[str, Any]]) -> plt.Figure:
    """Loss, learning rate, throughput and gradient norm against step (a panel for each logged key)."""
    step = np.array([r["step"] for r in records])
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("images_per_s", "images/s (all ranks)"),
              ("grad_norm", "gradient norm (before clipping)")]
    panels = [(key, title) for key, title in panels if any(r.get(key) is not None for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), constrained_layout=True)
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        values = np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)
        ax.plot(step, values, lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        epochs = [r["step"] for a, r in zip(records, records[1:]) if r["epoch"] != a["epoch"]]
        for boundary in epochs:  # epoch starts, to read a curve against the schedule
            ax.axvline(boundary, color="0.85", lw=0.6, zorder=0)
    return fig


def plot_training_log(log_path: str | Path, out: str | Path) -> Path | None:
    """``training_log_figure`` of ``train_log.jsonl``, written to ``out``. Returns None when the log
    has no records yet."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    return save_figure(training_log_figure(records), out) if records else None


def defense_matrix_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Per attack: ASR and clean accuracy of the baseline and, under mind control, of MCCI and each variant
    (``rows[i]["variants"]``: name -> runs, one per seed; extra MCCI seeds in ``mcci_seeds``, extra seeds of the
    undefended model in ``baseline_seeds``), bars at the mean over seeds."""
    names = [r["attack"] for r in rows]
    variants = list(rows[0].get("variants", {})) if rows else []
    bars = [("baseline (no defense)", lambda r: [r["baseline"], *[b["baseline"] for b in r.get("baseline_seeds", [])]]),
            ("MCCI, mind control", lambda r: [r["mcci"]["mind_control"]]
             + [m["mcci"]["mind_control"] for m in r.get("mcci_seeds", [])])]
    bars += [(f"MCCI {v}, mind control", lambda r, v=v: [m["mcci"]["mind_control"] for m in r["variants"][v]])
             for v in variants]
    x = np.arange(len(rows))
    width = 0.8 / len(bars)
    stacked = len(rows) * len(bars) > 12  # many bars: one wide panel above the other
    fig, axes = plt.subplots(2 if stacked else 1, 1 if stacked else 2, constrained_layout=True,
                             figsize=(0.35 * len(rows) * len(bars) + 2, 5.6) if stacked
                             else (max(6.0, 0.55 * len(rows) * len(bars) + 3), 3.2))
    for ax, metric, title in ((axes[0], "asr", "attack success rate"), (axes[1], "clean_acc", "clean accuracy")):
        for i, (label, runs) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, [np.mean([m[metric] for m in runs(r)]) for r in rows],
                   width, label=label, color=f"C{(3, 0, 2, 1, 4, 5, 6, 7, 8, 9)[i % 10]}")  # baseline red, MCCI blue
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=min(len(bars), 4), fontsize=8)
    return fig


def plot_defense_matrix(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """``defense_matrix_figure`` of ``rows``, written to ``out``."""
    return save_figure(defense_matrix_figure(rows), out)


def validation_log_figure(records: list[dict[str, Any]]) -> plt.Figure:
    """Clean accuracy, ASR and RA against epoch, one line per inference mode and weights (raw, EMA):
    where the attack lands and whether mind control holds."""
    series = sorted({(r["weights"], r["mode"]) for r in records})
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 2.8), constrained_layout=True)
    for ax, (key, title) in zip(axes, (("clean_acc", "clean accuracy"), ("asr", "attack success rate"),
                                       ("ra", "robust accuracy"))):
        for weights, mode in series:
            chosen = [r for r in records if r["weights"] == weights and r["mode"] == mode]
            ax.plot([r["epoch"] for r in chosen], [r[key] for r in chosen], marker="o", ms=3, lw=1,
                    label=f"{mode.replace('_', ' ')} ({weights})")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return fig


def plot_validation_log(log_path: str | Path, out: str | Path) -> Path | None:
    """``validation_log_figure`` of ``val_log.jsonl``, written to ``out``; None when it has no records."""
    path = Path(log_path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return save_figure(validation_log_figure(records), out) if records else None
