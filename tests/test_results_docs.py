"""The docs' results tables are generated from docs/results/*.json: the committed ones must be what the JSON
renders, and the renderer itself is checked on made-up results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.results_docs import DOCS, RESULTS, Results, ResultsError, main, render_markdown, render_table

PROVENANCE = {"command": "mcci train ...", "commit": "unknown", "machine": "a test", "date": "2026-12-01", "seed": 0,
              "settings": "made up", "chosen_on": "none (fixed in advance)", "weights": "raw"}


def test_the_committed_tables_are_what_the_results_json_renders(capsys):
    code = main(["--check", *map(str, DOCS)])
    assert code == 0, capsys.readouterr().err


def _results(folder: Path, **files: dict) -> Path:
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


def _experiment() -> dict:
    """A benchmark's output, with records that point into it and a table of them."""
    return {
        "baseline": {"clean_acc": 0.6595, "asr": 0.9998, "ra": 0.0002},
        "mind_control": [{"clean_acc": 0.58, "asr": 0.065, "ra": 0.56},
                         {"clean_acc": 0.60, "asr": 0.045, "ra": 0.58}],
        "record_defaults": dict(PROVENANCE),
        "records": [
            {"id": "baseline", "model": "undefended", "fields_from": {"$ref": "#/baseline"}},
            {"id": "mcci", "model": "MCCI", "seeds": [0, 1], "bold": ["asr"],
             "clean_acc": {"$mean_sd": [{"$ref": "#/mind_control/0/clean_acc"},
                                        {"$ref": "#/mind_control/1/clean_acc"}]},
             "asr": {"$mean_sd": [{"$ref": "#/mind_control/0/asr"}, {"$ref": "#/mind_control/1/asr"}]},
             "ca_less": {"$sub": [{"$ref": "#/mind_control/0/clean_acc"}, {"$ref": "#/baseline/clean_acc"}],
                         "scale": 100}},
        ],
        "tables": {"tiny": {"columns": [
            {"header": "model", "value": "{model}"},
            {"header": "CA", "value": ["{clean_acc:.3f} ({clean_acc[n]})", "{clean_acc:.3f}"]},
            {"header": "ASR", "value": "{asr:.3f}"},
            {"header": "CA less undefended", "value": "{ca_less:+.1f}", "missing": ""}]}},
    }


DOC = "# Made up\n\nProse stays.\n\n<!-- table: tiny -->\nold text\n<!-- /table -->\n\nMore prose.\n"


def test_a_table_is_rendered_between_its_markers_and_the_prose_is_left_alone(tmp_path):
    results = Results.load(_results(tmp_path / "results", exp=_experiment()))
    text, changed = render_markdown(DOC, results, "doc.md")
    assert changed == ["tiny"]
    assert text == ("# Made up\n\nProse stays.\n\n<!-- table: tiny -->\n"
                    "| model | CA | ASR | CA less undefended |\n| --- | --- | --- | --- |\n"
                    "| undefended | 0.659 | 1.000 |  |\n"
                    "| MCCI | 0.590 ± 0.014 (2) | **0.055 ± 0.014** | -8.0 |\n"
                    "<!-- /table -->\n\nMore prose.\n")
    assert render_markdown(text, results, "doc.md") == (text, [])  # rendering is idempotent


def test_check_names_the_table_whose_figure_changed_and_rendering_fixes_it(tmp_path, capsys):
    folder = _results(tmp_path / "results", exp=_experiment())
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    assert main(["--results", str(folder), str(doc)]) == 0
    assert main(["--check", "--results", str(folder), str(doc)]) == 0
    rendered = doc.read_text()

    changed = _experiment()
    changed["baseline"]["asr"] = 0.95  # a re-measurement lands in the JSON
    _results(folder, exp=changed)
    capsys.readouterr()
    assert main(["--check", "--results", str(folder), str(doc)]) == 1
    assert "doc.md: tiny" in capsys.readouterr().err
    assert doc.read_text() == rendered  # --check writes nothing
    assert main(["--results", str(folder), str(doc)]) == 0
    assert "| undefended | 0.659 | 0.950 |  |" in doc.read_text()


def test_an_unknown_or_unclosed_marker_is_an_error_naming_it(tmp_path, capsys):
    folder = _results(tmp_path / "results", exp=_experiment())
    doc = tmp_path / "doc.md"
    doc.write_text(DOC.replace("table: tiny", "table: no-such-table"))
    assert main(["--check", "--results", str(folder), str(doc)]) == 2
    assert "unknown table 'no-such-table'" in capsys.readouterr().err
    results = Results.load(folder)
    with pytest.raises(ResultsError, match="'tiny' is never closed"):
        render_markdown("<!-- table: tiny -->\n| a |\n", results, "doc.md")
    with pytest.raises(ResultsError, match="without an opening marker"):
        render_markdown("<!-- /table -->\n", results, "doc.md")


def test_a_record_without_its_provenance_or_a_template_that_fits_nothing_is_refused(tmp_path):
    data = _experiment()
    del data["record_defaults"]["chosen_on"]
    with pytest.raises(ResultsError, match="record 'baseline' lacks chosen_on"):
        render_table(Results.load(_results(tmp_path / "a", exp=data)), "tiny")
    data = _experiment()
    data["records"][0]["weights"] = "best"
    with pytest.raises(ResultsError, match="weights 'best'"):
        render_table(Results.load(_results(tmp_path / "b", exp=data)), "tiny")
    data = _experiment()
    data["tables"]["tiny"]["columns"][2]["value"] = "{asr_typo:.3f}"  # no "missing": a blank would hide the typo
    with pytest.raises(ResultsError, match="column 'ASR'.*asr_typo"):
        render_table(Results.load(_results(tmp_path / "c", exp=data)), "tiny")
    data = _experiment()
    data["records"][0]["fields_from"] = {"$ref": "#/nowhere"}
    with pytest.raises(ResultsError, match="nothing at 'nowhere'"):
        render_table(Results.load(_results(tmp_path / "d", exp=data)), "tiny")


def _campaign_summary() -> dict:
    """What benchmarks/campaign.py's summary() writes to campaign.json (figures made up)."""
    rows = []
    for attack, mcci_asr in (("badnets", 0.02), ("sig", 0.97)):
        for weights in ("raw", "ema"):
            rows.append({"attack": attack, "model": "undefended", "seed": 0, "weights": weights, "mode": "baseline",
                         "clean_acc": 0.95, "asr": 0.99, "ra": 0.01})
            rows.append({"attack": attack, "model": "mcci", "seed": 0, "weights": weights, "mode": "mind_control",
                         "clean_acc": 0.94, "asr": mcci_asr, "ra": 0.9, "der": 0.98})
    return {"plan": {"chosen_on": "dev split", "overrides": ["train.epochs=8"]}, "machine": "NVIDIA H200",
            "commit": "0123abc", "cells": [], "rows": rows}


def test_a_campaign_summary_is_tabled_by_a_spec_alone(tmp_path):
    spec = {"tables": {
        "campaign": {"records": "campaign.json#/rows", "where": {"weights": "ema"},
                     "defaults": {"command": "python -m benchmarks.campaign ...", "date": "2026-12-01",
                                  "machine": {"$ref": "campaign.json#/machine"},
                                  "commit": {"$ref": "campaign.json#/commit"},
                                  "settings": {"$ref": "campaign.json#/plan"},
                                  "chosen_on": {"$ref": "campaign.json#/plan/chosen_on"}},
                     "columns": [{"header": "attack", "value": "{attack}", "blank_repeats": True},
                                 {"header": "model", "value": "{model}"}, {"header": "seed", "value": "{seed}"},
                                 {"header": "CA / ASR / RA", "value": "{clean_acc:.3f} / {asr:.3f} / {ra:.3f}"},
                                 {"header": "DER", "value": "{der:.3f}", "missing": ""}]},
        "campaign-asr": {"records": "campaign.json#/rows", "where": {"weights": "raw"},
                         "defaults": {"command": "c", "date": "d", "machine": "m", "commit": "c", "settings": "s",
                                      "chosen_on": "dev split"},
                         "columns": [{"header": "attack", "value": "{attack}"}],
                         "pivot": {"key": "model", "columns": ["undefended", "mcci", "residual"], "value": "{asr:.3f}",
                                   "missing": "-"}}}}
    results = Results.load(_results(tmp_path / "results", **{"campaign": _campaign_summary(), "campaign-tables": spec}))
    assert render_table(results, "campaign").splitlines()[2:] == [
        "| badnets | undefended | 0 | 0.950 / 0.990 / 0.010 |  |",
        "|  | mcci | 0 | 0.940 / 0.020 / 0.900 | 0.980 |",
        "| sig | undefended | 0 | 0.950 / 0.990 / 0.010 |  |",
        "|  | mcci | 0 | 0.940 / 0.970 / 0.900 | 0.980 |"]
    assert render_table(results, "campaign-asr").splitlines() == [
        "| attack | undefended | mcci | residual |", "| --- | --- | --- | --- |",
        "| badnets | 0.990 | 0.020 | - |", "| sig | 0.990 | 0.970 | - |"]


def test_the_repository_results_folder_is_the_default():
    assert RESULTS.name == "results" and RESULTS.parent.name == "docs"
    assert all(doc.is_file() for doc in DOCS)
