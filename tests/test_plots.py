"""Figures draw the data they are given (read back from the figure's artists) and are written whole."""
import json

import numpy as np
from PIL import Image

from pipeline.support.plots import (defense_matrix_figure, plot_defense_matrix, plot_training_log, plt,
                                    training_log_figure)


def _records() -> list[dict]:
    return [{"step": s, "epoch": s // 10, "loss": 2.0 / s, "lr": 1e-3 * s, "images_per_s": 100.0 + s,
             "grad_norm": None} for s in range(1, 30)]


def test_training_curves_draw_each_logged_series_against_step():
    fig = training_log_figure(_records())
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["training loss", "learning rate", "images/s (all ranks)"]  # no grad norms
    steps = np.arange(1, 30)
    for ax, expected in zip(axes, (2.0 / steps, 1e-3 * steps, 100.0 + steps)):
        curve, *boundaries = ax.get_lines()
        np.testing.assert_array_equal(curve.get_xdata(), steps)
        np.testing.assert_allclose(curve.get_ydata(), expected)
        assert [line.get_xdata()[0] for line in boundaries] == [10, 20]  # the steps where epochs 1 and 2 start
    plt.close(fig)


def test_training_curves_from_a_log_and_nothing_from_an_empty_one(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("")
    assert plot_training_log(log, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()
    log.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    path = plot_training_log(log, tmp_path / "c.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]  # one row of panels
    assert not list(tmp_path.glob("*.tmp*"))


def _rows(names: list[str]) -> list[dict]:
    return [{"attack": name, "baseline": {"clean_acc": 0.9 - 0.01 * i, "asr": 1.0 - 0.1 * i, "ra": 0.0},
             "mcci": {"own": {}, "mind_control": {"clean_acc": 0.8 - 0.01 * i, "asr": 0.05 * i, "ra": 0.8}}}
            for i, name in enumerate(names)]


def test_defense_matrix_chart_draws_baseline_and_mind_control_per_attack(tmp_path):
    for names in (["badnets", "wanet", "sig"], [f"attack{i}" for i in range(8)]):  # side by side, and stacked
        rows = _rows(names)
        fig = defense_matrix_figure(rows)
        for ax, metric in zip(fig.axes, ("asr", "clean_acc")):
            assert [t.get_text() for t in ax.get_xticklabels()] == names
            baseline, mind_control = ax.containers
            assert [bar.get_height() for bar in baseline] == [r["baseline"][metric] for r in rows]
            assert [bar.get_height() for bar in mind_control] == [r["mcci"]["mind_control"][metric] for r in rows]
            assert all(b.get_x() < m.get_x() for b, m in zip(baseline, mind_control))  # baseline on the left
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["baseline (no defense)", "MCCI, mind control"]
        plt.close(fig)
    path = plot_defense_matrix(_rows(["badnets"]), tmp_path / "sub" / "m.png")
    assert Image.open(path).format == "PNG"
