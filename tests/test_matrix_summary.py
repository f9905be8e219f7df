"""The matrix summary: every run on disk, seeds grouped by name and checked to be one model's, pivoted per attack
and model, each run against the undefended model of its own seed."""
import json
import sys

import pytest
import yaml

from benchmarks.defense_matrix import ATTACK_FAILED
from benchmarks.matrix_summary import collected_rows, main as summary_main, run_group

from test_defense_matrix import _mcci_run, _row


def _save_config(trained, seed: int, defense: str = "mcci", **changes) -> None:
    """A run's saved model config (what `mcci train` writes beside the weights); ``changes``: dotted key -> value."""
    config = {"train": {"seed": seed, "defense": defense, "out": str(trained)}, "model": {"ain_widths": [8, 16, 32]},
              "optim": {"lr": 0.001}}
    for key, value in changes.items():
        section, name = key.split(".")
        config.setdefault(section, {})[name] = value
    (trained / "model").mkdir(parents=True)
    (trained / "model" / "config.yaml").write_text(yaml.safe_dump(config))


def _seed_of(name: str) -> int:
    return int(name.rpartition("-seed")[2]) if run_group(name) != name else 0


def _write_experiment(folder, attack: str, baseline_asr: float, mind_control_asr: float, runs: dict,
                      baselines: dict | None = None) -> None:
    """A finished experiment folder as defense_matrix leaves it: its metrics, its variants' runs (name -> (CA, ASR),
    trained with the seed their name says) and the undefended model's other seeds (seed -> (CA, ASR))."""
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"shards": {"attack": attack, "mode": "all-to-one",
                                                                   "poison_rate": 0.1, "attack_params": {}}}))
    (folder / "metrics.json").write_text(json.dumps(_row(attack, baseline_asr, mind_control_asr)))
    _save_config(folder / "mcci", 0)
    _save_config(folder / "baseline", 0, defense="none")
    for name, (ca, asr) in runs.items():
        (folder / "variants" / name).mkdir(parents=True)
        (folder / "variants" / name / "metrics.json").write_text(json.dumps(_mcci_run(ca, asr, 0.9)))
        _save_config(folder / "variants" / name / "mcci", _seed_of(name))
    for seed, (ca, asr) in (baselines or {}).items():
        (folder / "baselines" / f"seed{seed}").mkdir(parents=True)
        (folder / "baselines" / f"seed{seed}" / "metrics.json").write_text(json.dumps(
            {"baseline": {"clean_acc": ca, "asr": asr, "ra": 0.1}, "seed": seed}))
        _save_config(folder / "baselines" / f"seed{seed}" / "baseline", seed, defense="none")


def test_the_summary_groups_seeds_by_name_and_pivots_every_run_on_disk(tmp_path, monkeypatch):
    assert [run_group(n) for n in ("abl8-seed2", "mcci-seed1", "ain-s2", "lowpass", "x-seedy")] == \
        ["abl8", "mcci", "ain-s2", "lowpass", "x-seedy"]
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "sig", "sig", 0.99, 0.98, {"abl8": (0.56, 0.0), "abl8-seed1": (0.54, 0.02),
                                                          "mcci-seed1": (0.60, 0.96), "lowpass": (0.5, 0.99)},
                      baselines={1: (0.56, 0.97)})
    _write_experiment(matrix / "wanet", "wanet", 0.35, 0.06, {"abl8-seed1": (0.6, 0.05)})
    (matrix / "unfinished").mkdir()  # no metrics.json: not an experiment yet
    rows = collected_rows(matrix)
    assert [r["attack"] for r in rows] == ["sig", "wanet"]
    assert [m["mcci"]["mind_control"]["asr"] for m in rows[0]["variants"]["abl8"]] == [0.0, 0.02]
    assert [m["seed"] for m in rows[0]["variants"]["abl8"]] == [0, 1]  # read from each run's saved config
    assert len(rows[0]["mcci_seeds"]) == 1 and list(rows[1]["variants"]) == ["abl8"]
    assert [b["seed"] for b in rows[0]["baseline_seeds"]] == [1] and rows[1]["baseline_seeds"] == []
    assert rows[1]["verdict"] == ATTACK_FAILED

    monkeypatch.setattr(sys, "argv", ["matrix_summary", "--matrix", str(matrix)])
    summary_main()
    text = (matrix / "matrix_summary.md").read_text()
    asr_table = text.split("\n\n")[1].splitlines()
    assert asr_table[0] == "| attack (undefended CA / ASR) | MCCI | abl8 | lowpass |"  # most widely run first
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in asr_table[2:]]
    # the undefended model over its two seeds: CA 0.66 and 0.56, ASR 0.99 and 0.97
    assert cells[0] == ["sig (0.610 ± 0.071 / 0.980 ± 0.014, 2 seeds)", "0.970 ± 0.014 (2)", "0.010 ± 0.014 (2)",
                        "0.990"]
    assert cells[1] == ["wanet (0.660 / 0.350, attack failed on the baseline)", "0.060", "0.050", "-"]
    ca_table = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("\n\n")[5].splitlines()[2:]]
    # each seed less its own undefended model: abl8 0.56 - 0.66 and 0.54 - 0.56, MCCI 0.58 - 0.66 and 0.60 - 0.56
    assert ca_table[0][1:] == ["-0.020 ± 0.085 (2)", "-0.060 ± 0.057 (2)", "-0.160"]
    assert ca_table[1][2] == "no undefended seed 1"  # wanet's seed-1 run has no undefended model to be paired with
    assert (matrix / "matrix_summary.png").stat().st_size > 0
    assert len(json.loads((matrix / "matrix_summary.json").read_text())["rows"]) == 2

    with pytest.raises(SystemExit, match="no finished attack experiment"):
        collected_rows(tmp_path / "matrix" / "unfinished")


def _variant_config(matrix, name: str):
    return matrix / "badnets" / "variants" / name / "mcci" / "model" / "config.yaml"


def _edit(path, key: str, value) -> None:
    config = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    config.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("key, value, message", [
    ("model.ain_stem_stride", 1, r"'ain10' \(ain10, ain10-seed1, ain10-seed2\) were trained with different settings "
                                 r"\(model.ain_stem_stride\)"),  # the AIN's size rule changed in between
    ("optim.lr", 0.01, r"different settings \(optim.lr\)"),  # not the model: the recipe
    ("train.epochs", 30, r"different settings \(train.epochs\)"),
])
def test_seeds_of_one_name_trained_with_other_settings_are_refused(tmp_path, key, value, message):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"ain10": (0.6, 0.03), "ain10-seed1": (0.6, 1.0),
                                                                  "ain10-seed2": (0.6, 0.04)})
    _edit(_variant_config(matrix, "ain10-seed2"), key, value)
    with pytest.raises(SystemExit, match=message):
        collected_rows(matrix)
    (matrix / "badnets" / "variants" / "ain10-seed2").rename(matrix / "badnets" / "variants" / "ain10-new-rule")
    assert [len(runs) for runs in collected_rows(matrix)[0]["variants"].values()] == [2, 1]


def test_where_a_run_was_written_is_not_a_setting(tmp_path):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"ain10": (0.6, 0.03), "ain10-seed1": (0.6, 1.0)})
    _edit(_variant_config(matrix, "ain10-seed1"), "train.resume", True)  # it was interrupted and resumed
    _edit(_variant_config(matrix, "ain10-seed1"), "data.shards", "/elsewhere/shards")  # the matrix was moved since
    assert len(collected_rows(matrix)[0]["variants"]["ain10"]) == 2


def test_a_seed_counted_twice_is_refused(tmp_path):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"x": (0.6, 0.03), "x-seed1": (0.6, 0.05)})
    _edit(_variant_config(matrix, "x"), "train.seed", 1)  # "x: train.seed=1", then --seeds 1 once more
    with pytest.raises(SystemExit, match="of the runs of 'x', x and x-seed1 have train.seed=1: one seed would be "
                                         "counted as several"):
        collected_rows(matrix)
    _edit(_variant_config(matrix, "x"), "train.seed", 0)
    _edit(_variant_config(matrix, "x-seed1"), "train.seed", 0)  # hand-named after a seed it was not trained with
    with pytest.raises(SystemExit, match="x-seed1 has train.seed=0; its name says another seed"):
        collected_rows(matrix)


def test_a_run_without_its_saved_config_cannot_be_averaged(tmp_path):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"x": (0.6, 0.03), "x-seed1": (0.6, 0.05)})
    _variant_config(matrix, "x-seed1").unlink()
    with pytest.raises(SystemExit, match="x-seed1/mcci/model/config.yaml is missing"):
        collected_rows(matrix)


def test_an_undefended_seed_is_checked_like_the_defences(tmp_path):
    matrix = tmp_path / "matrix"
    _write_experiment(matrix / "badnets", "badnets", 1.0, 0.06, {"x-seed1": (0.6, 0.05)}, baselines={1: (0.6, 0.9)})
    undefended = matrix / "badnets" / "baselines" / "seed1" / "baseline" / "model" / "config.yaml"
    _edit(undefended, "train.seed", 2)
    with pytest.raises(SystemExit, match="baseline-seed1 has train.seed=2; its name says another seed"):
        collected_rows(matrix)
    _edit(undefended, "train.seed", 1)
    _edit(undefended, "optim.lr", 0.1)  # not the experiment's recipe: its figures would pair with a seed of another one
    with pytest.raises(SystemExit, match=r"'the undefended model' \(baseline, baseline-seed1\) were trained with "
                                         r"different settings \(optim.lr\)"):
        collected_rows(matrix)
