"""Figures are written whole, from the logs and metrics the jobs write."""
import json

from PIL import Image

from pipeline.support.plots import plot_defense_matrix, plot_training_log


def test_training_curves_from_a_log_and_nothing_from_an_empty_one(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("")
    assert plot_training_log(log, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()
    log.write_text("".join(json.dumps({"step": s, "epoch": s // 10, "loss": 2.0 / s, "lr": 1e-3, "images_per_s": 100.0,
                                       "grad_norm": None}) + "\n" for s in range(1, 30)))
    path = plot_training_log(log, tmp_path / "c.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]  # one row of panels
    assert not list(tmp_path.glob("*.tmp*"))


def test_defense_matrix_chart(tmp_path):
    metrics = {"clean_acc": 0.9, "asr": 0.05, "ra": 0.8}
    rows = [{"attack": name, "baseline": {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0},
             "mcci": {"own": metrics, "mind_control": metrics}} for name in ("badnets", "wanet", "sig")]
    path = plot_defense_matrix(rows, tmp_path / "sub" / "m.png")
    assert Image.open(path).format == "PNG"
