"""The matrix summary: every run on disk, seeds grouped by name, pivoted per attack and model."""
import json
import sys

import pytest
import yaml

from benchmarks.defense_matrix import ATTACK_FAILED
from benchmarks.matrix_summary import collected_rows, main as summary_main, run_group

from test_defense_matrix import _mcci_run, _row


def _write_experiment(folder, attack: str, baseline_asr: float, mind_control_asr: float, runs: dict) -> None:
    """A finished experiment folder as defense_matrix leaves it: its metrics and its variants' runs."""
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"shards": {"attack": attack, "mode": "all-to-one",
                                                                   "poison_rate": 0.1, "attack_params": {}}}))
    (folder / "metrics.json").write_text(json.dumps(_row(attack, baseline_asr, mind_control_asr)))
    for name, (ca, asr) in runs.items():
        (folder / "variants" / name).mkdir(parents=True)
        (folder / "variants" / name / "metrics.json").write_text(json.dumps(_mcci_run(ca, asr, 0.9)))


def test_the_summary_groups_seeds_by_name_and_pivots_every_run_on_disk(tmp_path, monkeypatch):
    assert [run_group(n) for n in ("abl8-seed2", "mcci-seed1", "ain-s2", "lowpass", "x-seedy")] == \
        ["abl8", "mcci", "ain-s2", "lowpass", "x-seedy"]
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "sig", "sig", 0.99, 0.98, {"abl8": (0.56, 0.0), "abl8-seed1": (0.54, 0.02),
                                                          "mcci-seed1": (0.60, 0.96), "lowpass": (0.5, 0.99)})
    _write_experiment(matrix / "wanet", "wanet", 0.35, 0.06, {"abl8-seed1": (0.6, 0.05)})
    (matrix / "unfinished").mkdir()  # no metrics.json: not an experiment yet
    rows = collected_rows(matrix)
    assert [r["attack"] for r in rows] == ["sig", "wanet"]
    assert [m["mcci"]["mind_control"]["asr"] for m in rows[0]["variants"]["abl8"]] == [0.0, 0.02]
    assert len(rows[0]["mcci_seeds"]) == 1 and list(rows[1]["variants"]) == ["abl8"]
    assert rows[1]["verdict"] == ATTACK_FAILED

    monkeypatch.setattr(sys, "argv", ["matrix_summary", "--matrix", str(matrix)])
    summary_main()
    text = (matrix / "matrix_summary.md").read_text()
    asr_table = text.split("\n\n")[1].splitlines()
    assert asr_table[0] == "| attack (undefended CA / ASR) | MCCI | abl8 | lowpass |"  # most widely run first
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in asr_table[2:]]
    assert cells[0] == ["sig (0.660 / 0.990)", "0.970 ± 0.014 (2)", "0.010 ± 0.014 (2)", "0.990"]
    assert cells[1] == ["wanet (0.660 / 0.350, attack failed on the baseline)", "0.060", "0.050", "-"]
    ca_table = text.split("\n\n")[5].splitlines()
    assert ca_table[2].split("|")[4].strip() == "-0.160" and ca_table[2].split("|")[2].strip().startswith("-0.")  # lowpass on sig: 0.5 against the undefended 0.66
    assert (matrix / "matrix_summary.png").stat().st_size > 0
    assert len(json.loads((matrix / "matrix_summary.json").read_text())["rows"]) == 2

    with pytest.raises(SystemExit, match="no finished attack experiment"):
        collected_rows(tmp_path / "matrix" / "unfinished")


def test_seeds_of_one_name_trained_as_different_models_are_refused(tmp_path):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"ain10": (0.6, 0.03), "ain10-seed1": (0.6, 1.0),
                                                                  "ain10-seed2": (0.6, 0.04)})
    for name, stride in (("ain10", 2), ("ain10-seed1", 2), ("ain10-seed2", 1)):  # the size rule changed in between
        saved = matrix / "badnets" / "variants" / name / "mcci" / "model"
        saved.mkdir(parents=True)
        (saved / "config.yaml").write_text(yaml.safe_dump({"model": {"ain_widths": [8, 16, 32], "ain_stem_stride": stride},
                                                           "train": {"seed": 0}}))
    with pytest.raises(SystemExit, match="'ain10' .* different model settings \\(ain_stem_stride\\)"):
        collected_rows(matrix)
    (matrix / "badnets" / "variants" / "ain10-seed2").rename(matrix / "badnets" / "variants" / "ain10-new-rule")
    assert [len(runs) for runs in collected_rows(matrix)[0]["variants"].values()] == [2, 1]
