"""run_experiment (what `mcci quickstart` and the defense matrix run): shards -> both models -> metrics + audit."""
import dataclasses
import json

import pytest
import yaml

from pipeline.data.manifest import fingerprint, load_manifest
from pipeline.jobs.experiment import run_experiment, run_variant
from pipeline.support.metrics import defense_effectiveness_rating
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


def test_a_variant_trains_beside_a_finished_experiment_on_its_shards_and_against_its_baseline(image_tree, tmp_path):
    spec = BuildSpec(source=str(image_tree), out="", attack="badnets", poison_rate=0.2, shard_size=16, trusted_count=6)
    out = tmp_path / "exp"
    with pytest.raises(JobError, match="no finished experiment"):
        run_variant(out, "seed1", ["train.seed=1"], overrides=TINY_TRAIN)
    results = run_experiment(out, spec, overrides=TINY_TRAIN, references=())
    assert results["seed"] == 0
    shards_before = sorted(p.name for p in (out / "shards").iterdir())
    # the undefended model of seed 1, as run_baseline leaves it (figures made up, so DER shows which it was against)
    seed1 = out / "baselines" / "seed1"
    seed1.mkdir(parents=True)
    (seed1 / "experiment.json").write_text(json.dumps({"experiment": json.loads((out / "experiment.json").read_text()),
                                                       "baseline_seed": 1}))
    undefended = {"clean_acc": 0.25, "asr": 0.75, "ra": 0.125}
    (seed1 / "metrics.json").write_text(json.dumps({"baseline": undefended, "data": results["data"], "seed": 1}))

    variant = run_variant(out, "seed1", ["train.seed=1"], overrides=TINY_TRAIN)
    folder = out / "variants" / "seed1"
    saved = yaml.safe_load((folder / "mcci" / "model" / "config.yaml").read_text())
    assert saved["train"]["seed"] == 1 and saved["train"]["defense"] == "mcci" and variant["seed"] == 1
    assert saved["data"]["shards"] == str(out / "shards") and sorted(p.name for p in (out / "shards").iterdir()) == shards_before
    for mode in ("own", "mind_control"):  # DER against the undefended model of the run's own seed
        assert variant["mcci"][mode]["der"] == defense_effectiveness_rating(undefended, variant["mcci"][mode])
    same_seed = run_variant(out, "narrow", ["model.ain_widths=[4,4,4]"], overrides=TINY_TRAIN)
    for mode in ("own", "mind_control"):  # seed 0: the experiment's own undefended model
        assert same_seed["mcci"][mode]["der"] == defense_effectiveness_rating(results["baseline"], same_seed["mcci"][mode])
    assert variant["audit"]["samples"] == results["audit"]["samples"]
    assert json.loads((folder / "metrics.json").read_text()) == variant
    (folder / "mcci" / "model" / "model.safetensors").unlink()  # finished: reused, not retrained
    assert run_variant(out, "seed1", ["train.seed=1"], overrides=TINY_TRAIN) == variant

    with pytest.raises(JobError, match="variant: \\['train.seed=1'\\] there, \\['train.seed=2'\\] now"):
        run_variant(out, "seed1", ["train.seed=2"], overrides=TINY_TRAIN)
    with pytest.raises(JobError, match="another configuration .*train.epochs: 1 there, 2 now"):
        run_variant(out, "other", [], overrides=[*TINY_TRAIN, "train.epochs=2"])
    with pytest.raises(JobError, match="sets train.defense=none"):
        run_variant(out, "undefended", ["train.defense=none"], overrides=TINY_TRAIN)
    assert not (out / "variants" / "other").exists() and not (out / "variants" / "undefended").exists()

    # the shards were built again since the experiment was evaluated (another content, the same configuration):
    # its undefended model's figures are of other test images, so no variant is scored against them
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    (out / "shards" / "manifest.json").write_text(json.dumps({**manifest, "seed": 7}))
    rebuilt = fingerprint(load_manifest(str(out / "shards")))
    for name, overrides, baseline_file in (("late", [], out / "metrics.json"),
                                           ("late-seed1", ["train.seed=1"], seed1 / "metrics.json")):
        with pytest.raises(JobError, match=f"{baseline_file} was evaluated on shards with data fingerprint "
                                           f"{results['data']['shards']}, {out / 'shards'} has {rebuilt}"):
            run_variant(out, name, overrides, overrides=TINY_TRAIN)
        assert not (out / "variants" / name / "mcci").exists()  # refused before training


def test_an_experiment_recorded_before_a_key_existed_is_the_same_while_that_key_keeps_its_default(image_tree, tmp_path):
    spec = BuildSpec(source=str(image_tree), out="", attack="badnets", poison_rate=0.2, shard_size=16, trusted_count=6)
    out = tmp_path / "exp"
    results = run_experiment(out, spec, overrides=TINY_TRAIN, references=())
    recorded = json.loads((out / "experiment.json").read_text())
    del recorded["config"]["model"]["ain_view"], recorded["config"]["data"]["augment"]["mixup_alpha"]
    del recorded["shards"]["crop_pct"]
    (out / "experiment.json").write_text(json.dumps(recorded))  # as an older version wrote it
    assert run_experiment(out, spec, overrides=TINY_TRAIN, references=()) == results
    with pytest.raises(JobError, match="model.ain_view: 'spectrum' there, 'spectrum\\+lowpass' now"):
        run_experiment(out, spec, overrides=[*TINY_TRAIN, "model.ain_view=spectrum+lowpass"], references=())
    with pytest.raises(JobError, match="shards.crop_pct: 1.0 there, 0.875 now"):
        run_experiment(out, dataclasses.replace(spec, crop_pct=0.875), overrides=TINY_TRAIN, references=())

    # a variant claimed by an older version: it copied the experiment's record with the keys that record lacks
    # filled in at that version's defaults, one of which has changed since (mixup_alpha 0.5 then, 0.0 now)
    variant = out / "variants" / "seed1"
    variant.mkdir(parents=True)
    old_claim = json.loads(json.dumps(recorded))
    old_claim["config"]["data"]["augment"]["mixup_alpha"] = 0.5
    (variant / "experiment.json").write_text(json.dumps({"experiment": old_claim, "variant": ["optim.lr=0.002"]}))
    (variant / "metrics.json").write_text(json.dumps({"finished": True}))
    assert run_variant(out, "seed1", ["optim.lr=0.002"], overrides=TINY_TRAIN) == {"finished": True, "seed": 0}
    old_claim["config"]["train"]["epochs"] = 5  # a key the experiment's record states still decides
    (variant / "experiment.json").write_text(json.dumps({"experiment": old_claim, "variant": ["optim.lr=0.002"]}))
    with pytest.raises(JobError, match="experiment.config.train.epochs: 5 there, 1 now"):
        run_variant(out, "seed1", ["optim.lr=0.002"], overrides=TINY_TRAIN)
