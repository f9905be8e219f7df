"""run_experiment (what `mcci quickstart` and the defense matrix run): shards -> both models -> metrics + audit."""
import dataclasses
import json

import pytest

from pipeline.jobs.experiment import run_experiment
from pipeline.support.errors import JobError
from shards.build import BuildSpec

from conftest import TINY_TRAIN


def test_experiment_writes_metrics_and_audit_then_reuses_them_only_for_the_same_configuration(image_tree, tmp_path,
                                                                                              capsys):
    spec = BuildSpec(source=str(image_tree), out="", attack="badnets", poison_rate=0.2, shard_size=16, trusted_count=6)
    out = tmp_path / "exp"
    results = run_experiment(out, spec, overrides=TINY_TRAIN, references=("spectrum:trusted:3",))
    assert set(results["mcci"]) == {"own", "mind_control"} and "clean_acc" in results["baseline"]
    assert "der" in results["mcci"]["mind_control"] and "der" in results["references"]["spectrum:trusted:3"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert results["audit"]["samples"] == manifest["splits"]["train"]["count"]
    assert results["audit"]["recorded_poisoned"]["count"] == manifest["splits"]["train"]["poisoned"]
    assert (out / "audit" / "samples.jsonl").exists()
    assert json.loads((out / "metrics.json").read_text()) == results
    (out / "mcci" / "model" / "model.safetensors").unlink()  # a finished experiment is not retrained or re-read
    assert run_experiment(out, spec, overrides=TINY_TRAIN, references=("spectrum:trusted:3",)) == results
    assert "reusing" in capsys.readouterr().out
    # any other configuration is refused, naming what changed, and nothing there is touched
    same = dict(shards=spec, overrides=TINY_TRAIN, references=("spectrum:trusted:3",))
    for change, named in (
        (dict(overrides=[*TINY_TRAIN, "train.epochs=2"]), "config.train.epochs: 1 there, 2 now"),
        (dict(shards=dataclasses.replace(spec, poison_rate=0.3)), "shards.poison_rate: 0.2 there, 0.3 now"),
        (dict(references=("feature:trusted:1",)), "references"),
    ):
        with pytest.raises(JobError, match=named):
            run_experiment(out, **{**same, **change})
    assert json.loads((out / "metrics.json").read_text()) == results


def test_a_folder_of_unknown_results_is_refused(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "metrics.json").write_text("{}")  # written by an older version or by hand
    with pytest.raises(JobError, match="has no experiment.json"):
        run_experiment(tmp_path / "exp", BuildSpec(source="embedded:digits", out=""), overrides=TINY_TRAIN)
