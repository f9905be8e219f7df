"""run_experiment (what `mcci quickstart` and the defense matrix run): shards -> both models -> metrics + audit."""
import json

from pipeline.jobs.experiment import run_experiment
from shards.build import BuildSpec

from conftest import TINY_TRAIN


def test_experiment_writes_metrics_and_audit_then_reuses_them(image_tree, tmp_path):
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
    assert run_experiment(out, spec, overrides=TINY_TRAIN) == results
