"""The defense matrix's table: an attack that did not backdoor the undefended model is not counted as defended."""
import argparse
import json
import sys

import pytest
import yaml

from benchmarks.defense_matrix import ATTACK_FAILED, main, parse_variant, table, verdict
from pipeline.support.metrics import defense_effectiveness_rating
from pipeline.support.plots import defense_matrix_figure

from conftest import TINY_TRAIN, make_image_tree


def _row(attack: str, baseline_asr: float, mind_control_asr: float) -> dict:
    return {"attack": attack, "poison_rate": 0.1, "seconds": 60.0, "seed": 0,
            "baseline": {"clean_acc": 0.66, "asr": baseline_asr, "ra": 0.6},
            "mcci": {"own": {"clean_acc": 0.63, "asr": baseline_asr, "ra": 0.5, "der": 0.49},
                     "mind_control": {"clean_acc": 0.58, "asr": mind_control_asr, "ra": 0.56, "der": 0.93}},
            "audit": {"recorded_poisoned": {"auroc": 0.99}}}


def test_verdicts_from_the_baseline_and_mind_control_asr():
    assert verdict(_row("ftrojan", 0.08, 0.18)) == ATTACK_FAILED == "attack failed on the baseline"
    assert verdict(_row("edge", 0.499, 0.0)) == ATTACK_FAILED  # a low mind-control ASR does not rescue it
    assert verdict(_row("badnets", 1.0, 0.065)) == "removed"
    assert verdict(_row("edge", 0.5, 0.10)) == "removed"
    assert verdict(_row("sig", 0.995, 0.998)) == "not removed"


def test_table_marks_a_failed_attack_and_gives_it_no_der():
    lines = table([_row("badnets", 1.0, 0.065), _row("ftrojan", 0.08, 0.05)]).splitlines()
    assert lines[0].endswith("| verdict |") and len(lines) == 2 + 6
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    der, last = header.index("DER"), header.index("verdict")
    badnets, ftrojan = cells[:3], cells[3:]
    assert [c[der] for c in badnets] == ["", "0.490", "0.930"] and badnets[2][last] == "removed"
    assert [c[der] for c in ftrojan] == ["", "", ""]  # no DER credited for a backdoor that never landed
    assert ftrojan[0][last] == ftrojan[2][last] == ATTACK_FAILED and ftrojan[1][last] == ""
    assert ftrojan[2][header.index("ASR")] == "0.050"  # the figures themselves are still shown


def _mcci_run(ca: float, asr: float, auroc: float, seed: int = 0) -> dict:
    return {"seed": seed, "mcci": {"own": {"clean_acc": ca, "asr": 0.9, "ra": 0.1, "der": 0.5},
                     "mind_control": {"clean_acc": ca, "asr": asr, "ra": 0.5, "der": 0.9}},
            "audit": {"recorded_poisoned": {"auroc": auroc}}}


def test_variants_and_seeds_get_their_own_rows_with_mean_and_spread_and_a_verdict_from_the_mean():
    row = _row("sig", 0.99, 0.98)  # MCCI did not remove it; a variant's seeds did, on average
    row["mcci_seeds"] = [_mcci_run(0.60, 0.96, 0.3, seed=1)]
    row["variants"] = {"lowpass": [_mcci_run(0.50, 0.02, 0.9), _mcci_run(0.60, 0.04, 0.8, seed=1),
                                   _mcci_run(0.70, 0.15, 0.7, seed=2)]}
    lines = table([row]).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[2] for c in cells] == ["baseline", "MCCI own spectrum (2 seeds)", "MCCI mind control (2 seeds)",
                                     "MCCI lowpass own spectrum (3 seeds)", "MCCI lowpass mind control (3 seeds)"]
    assert cells[2][4] == "0.970 ± 0.014" and cells[2][9] == "not removed"  # mean of 0.98 and 0.96
    assert cells[4][3] == "0.600 ± 0.100" and cells[4][4] == "0.070 ± 0.070" and cells[4][7] == "0.800 ± 0.100"
    assert cells[4][9] == "removed" and verdict(row) == "not removed"  # the attack's verdict stays MCCI's


def test_the_verdict_and_the_baseline_row_read_the_undefended_model_of_every_seed_averaged():
    # the attack landed on seed 0's undefended model only: over the three seeds MCCI is averaged on, it failed
    row = _row("wanet", 0.90, 0.02)
    row["baseline_seeds"] = [{"seed": 1, "baseline": {"clean_acc": 0.60, "asr": 0.10, "ra": 0.8}},
                             {"seed": 2, "baseline": {"clean_acc": 0.62, "asr": 0.05, "ra": 0.9}}]
    row["mcci_seeds"] = [_mcci_run(0.6, 0.01, 0.9, seed=1), _mcci_run(0.6, 0.03, 0.9, seed=2)]
    assert verdict(row) == ATTACK_FAILED  # mean undefended ASR 0.35
    assert verdict(row, [row]) == "removed"  # seed 0's MCCI run alone against seed 0's undefended model (0.90)
    lines = table([row]).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][2:6] == ["baseline (3 seeds)", "0.627 ± 0.031", "0.350 ± 0.477", "0.767 ± 0.153"]
    assert cells[0][9] == cells[2][9] == ATTACK_FAILED and cells[2][6] == ""  # no DER credited


@pytest.mark.parametrize("seeds, message", [("0,1", "--seeds 0 is the train.seed mcci is trained with already"),
                                            ("1,2,1", "--seeds repeats 1"),
                                            ("3", "--seeds 3 is the train.seed iso3 is trained with already")])
def test_a_seed_is_refused_that_would_be_counted_twice(tmp_path, monkeypatch, capsys, seeds, message):
    out = tmp_path / "matrix"
    monkeypatch.setattr(sys, "argv", ["defense_matrix", "--source", str(tmp_path / "none"), "--out", str(out),
                                      "--attacks", "badnets", "--variant", "iso3: train.seed=3", "--seeds", seeds])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_matrix_figure_draws_a_bar_per_variant():
    row = _row("sig", 0.99, 0.98)
    row["variants"] = {"lowpass": [_mcci_run(0.5, 0.02, 0.9)], "isolate": [_mcci_run(0.5, 0.5, 0.9)]}
    figure = defense_matrix_figure([row, row])
    asr_axis = figure.axes[0]
    assert [c.get_label() for c in asr_axis.containers] == ["baseline (no defense)", "MCCI, mind control",
                                                           "MCCI lowpass, mind control", "MCCI isolate, mind control"]
    heights = [[bar.get_height() for bar in c] for c in asr_axis.containers]
    assert heights == [[0.99, 0.99], [0.98, 0.98], [0.02, 0.02], [0.5, 0.5]]


def test_a_variant_is_one_argument_so_the_overrides_after_it_stay_the_matrixs():
    assert parse_variant("lowpass: model.ain_view=spectrum+lowpass") == ("lowpass", ["model.ain_view=spectrum+lowpass"])
    assert parse_variant("iso:train.mcci_variant=isolate  train.isolate_epoch=2") == (
        "iso", ["train.mcci_variant=isolate", "train.isolate_epoch=2"])
    assert parse_variant("seed-free:") == ("seed-free", [])  # plain MCCI again, e.g. with --seeds
    for bad in ("lowpass model.ain_view=spectrum+lowpass", ": train.seed=1", "x: model.ain_view"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            parse_variant(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="plain MCCI's own"):
        parse_variant("mcci: train.mcci_variant=lff")  # would be merged with plain MCCI's seeds


def test_the_matrix_trains_each_variant_and_seed_beside_mcci_and_tables_them(tmp_path, monkeypatch):
    out = tmp_path / "matrix"
    images = make_image_tree(tmp_path / "data", per_class=50)  # the matrix keeps 100 trusted images
    argv = ["defense_matrix", "--source", str(images), "--attacks", "badnets", "--epochs", "1", "--out", str(out),
            "--variant", "narrow: model.ain_widths=[4,4,4]", "--seeds", "1", *TINY_TRAIN]  # the overrides follow
    monkeypatch.setattr(sys, "argv", argv)
    main()
    result = json.loads((out / "defense_matrix.json").read_text())
    row = result["rows"][0]
    assert result["variants"] == {"narrow": ["model.ain_widths=[4,4,4]"]} and result["seeds"] == [1]
    assert len(row["mcci_seeds"]) == 1 and len(row["variants"]["narrow"]) == 2
    runs = out / "badnets" / "variants"
    assert sorted(p.name for p in runs.iterdir()) == ["mcci-seed1", "narrow", "narrow-seed1"]
    for name, widths, seed in (("mcci-seed1", [8, 8, 8], 1), ("narrow", [4, 4, 4], 0), ("narrow-seed1", [4, 4, 4], 1)):
        saved = yaml.safe_load((runs / name / "mcci" / "model" / "config.yaml").read_text())
        assert (saved["model"]["ain_widths"], saved["train"]["seed"]) == (widths, seed)
        assert saved["data"]["augment"] == row_config(out)["data"]["augment"]  # the matrix's own overrides kept
    # the undefended model is trained again with seed 1, and every seed-1 run's DER is against it
    undefended = out / "badnets" / "baselines" / "seed1"
    saved = yaml.safe_load((undefended / "baseline" / "model" / "config.yaml").read_text())
    assert (saved["train"]["seed"], saved["train"]["defense"]) == (1, "none")
    seed1 = json.loads((undefended / "metrics.json").read_text())
    assert row["baseline_seeds"] == [seed1] and seed1["seed"] == 1 and row["seed"] == 0
    for run, baseline in ((row["mcci_seeds"][0], seed1), (row["variants"]["narrow"][1], seed1),
                          (row["variants"]["narrow"][0], row)):
        for mode in ("own", "mind_control"):
            assert run["mcci"][mode]["der"] == defense_effectiveness_rating(baseline["baseline"], run["mcci"][mode])
    labels = [line.split("|")[3].strip() for line in (out / "defense_matrix.md").read_text().splitlines()[2:]]
    assert labels == ["baseline (2 seeds)", "MCCI own spectrum (2 seeds)", "MCCI mind control (2 seeds)",
                      "MCCI narrow own spectrum (2 seeds)", "MCCI narrow mind control (2 seeds)"]


def row_config(out) -> dict:
    return json.loads((out / "badnets" / "experiment.json").read_text())["config"]



@pytest.mark.parametrize("attacks, message", [(["badnets", "data.augment.hflip=true"], "is a training override"),
                                              (["badnets", "nosuch"], "unknown attack 'nosuch'")])
def test_every_attack_is_checked_before_anything_is_built(tmp_path, monkeypatch, capsys, attacks, message):
    # found when overrides placed after --attacks were taken for attacks, after the first attack had trained
    out = tmp_path / "matrix"
    monkeypatch.setattr(sys, "argv", ["defense_matrix", "--out", str(out), "--attacks", *attacks])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
