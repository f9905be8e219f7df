"""`mcci refit-head`: the last layer refitted on the trusted split, as a model of its own that every job takes."""
import json

import pytest
import torch

from pipeline.cli import main
from pipeline.components.head_refit import (accuracy, choose_weight_decay, fit_head, layer_inputs, read_head,
                                            refit_layer, write_head)
from pipeline.components.models import build_transform, load_trained
from pipeline.jobs.refit_head import refit_head
from pipeline.support.errors import JobError

CPU = ["--num-workers", "0", "--device", "cpu"]


def test_cross_validation_picks_the_strongest_penalty_that_still_separates_the_classes():
    # the class signal is small (0.2): a strong penalty flattens the weights and loses it, a weak one keeps it
    labels = torch.arange(40) % 2
    features = torch.stack([(labels * 2 - 1) * 0.2, torch.zeros(40)], dim=1)
    start = (torch.zeros(2, 2), torch.zeros(2))
    best, held_out = choose_weight_decay(features, labels, start, grid=(1e-4, 1e-1, 10.0))
    assert held_out[1e-4] == 1.0 and held_out[1e-1] == 1.0 and held_out[10.0] < 1.0
    assert best == 1e-1  # ties go to the stronger penalty


@pytest.mark.parametrize("run", ["baseline", "mcci"])
def test_read_and_write_head_round_trip_through_the_model_as_it_predicts(trained, tiny_shards, run):
    model, cfg, _ = load_trained(trained / run, torch.device("cpu"))
    layer, width = refit_layer(model)
    images = torch.randn(6, 3, 32, 32)
    batch = type("Batch", (), {"images": images, "labels": torch.zeros(6, dtype=torch.long),
                               "orig_labels": torch.zeros(6, dtype=torch.long), "indices": torch.arange(6)})
    inputs = layer_inputs(model, [batch], build_transform(cfg, spectra=False), torch.device("cpu"))
    assert inputs["features"].shape == (6, width)
    assert inputs["constant"].numel() == (layer.in_features - width)  # MCCI: the reference feature; else none
    head = read_head(layer, width, inputs["constant"])
    normalised = build_transform(cfg, spectra=False)(images, train=False).images
    with torch.no_grad():
        assert torch.allclose(inputs["features"] @ head[0].T + head[1], model(normalised), atol=1e-5)
        new = (torch.randn_like(head[0]), torch.randn_like(head[1]))
        write_head(layer, width, inputs["constant"], new)
        assert torch.allclose(inputs["features"] @ new[0].T + new[1], model(normalised), atol=1e-4)


@pytest.mark.parametrize("run", ["baseline", "mcci"])
def test_refit_head_writes_a_model_that_eval_takes_and_that_predicts_with_the_refitted_head(trained, tiny_shards,
                                                                                            tmp_path, run):
    out = tmp_path / "refit"
    main(["refit-head", "--checkpoint", str(trained / run), "--shards", str(tiny_shards), "--out", str(out),
          "--weight-decay", "cv", *CPU])
    record = json.loads((out / "refit.json").read_text())
    assert record["samples"] == 6 and record["split"] == "trusted"
    assert float(record["weight_decay"]) in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert set(record["cross_validated_accuracy"]) == {"0.0001", "0.001", "0.01", "0.1", "1"}

    old, cfg, _ = load_trained(trained / run, torch.device("cpu"))
    new, _, meta = load_trained(out, torch.device("cpu"))
    assert meta["head_refit"]["weight_decay"] == record["weight_decay"]
    # only the last layer changed
    changed = {k for k, v in new.state_dict().items() if not torch.equal(v, old.state_dict()[k])}
    assert changed and all(k.startswith(("head.", "head", "fc.", "classifier.")) for k in changed), changed
    # the new head is the logistic regression the component fits on the trusted features, from the old head
    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest

    loader = eval_loader(str(tiny_shards), load_manifest(str(tiny_shards)), "trusted", 256, 0, by_rank=False)
    data = layer_inputs(old, loader, build_transform(cfg, spectra=False), torch.device("cpu"))
    expected = fit_head(data["features"], data["labels"], read_head(*refit_layer(old), data["constant"]),
                        record["weight_decay"])
    got = read_head(*refit_layer(new), data["constant"])
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-5)
    assert record["trusted_accuracy_after"] == pytest.approx(accuracy(expected, data["features"], data["labels"]),
                                                             abs=1e-4)

    main(["eval", "--checkpoint", str(out), "--shards", str(tiny_shards), "--out", str(tmp_path / "m.json"), *CPU])
    assert "clean_acc" in json.dumps(json.loads((tmp_path / "m.json").read_text()))


def test_a_given_weight_decay_is_used_and_not_cross_validated(trained, tiny_shards, tmp_path):
    record = refit_head(trained / "mcci", str(tiny_shards), tmp_path / "r", weight_decay=0.5, num_workers=0,
                        device="cpu")
    assert record["weight_decay"] == 0.5 and record["chosen_by"] == "given" and not record["cross_validated_accuracy"]
    default = refit_head(trained / "mcci", str(tiny_shards), tmp_path / "d", num_workers=0, device="cpu")
    assert default["weight_decay"] == 0.01 and default["chosen_by"] == "given" and default["samples"] == 6
    # the trusted split is in class order (class_2 last); a random subset of 5 still holds every class here
    five = refit_head(trained / "mcci", str(tiny_shards), tmp_path / "f", weight_decay=0.0, max_images=5,
                      num_workers=0, device="cpu")
    assert five["samples"] == 5
    # one image cannot hold three classes: refused before any work, naming --max-images, not the trusted split
    with pytest.raises(JobError, match=r"--max-images 1 is fewer than the model's 3 classes: .*raise --max-images to "
                                       "at least 3"):
        refit_head(trained / "mcci", str(tiny_shards), tmp_path / "g", max_images=1, num_workers=0, device="cpu")


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_refit_head_refuses_what_it_cannot_do_safely(trained, tiny_shards, tmp_path, capsys):
    from shards.build import BuildSpec, build_shards

    base = ["refit-head", "--checkpoint", str(trained / "mcci"), *CPU]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("a user's file")
    assert "is not empty" in _error(capsys, [*base, "--shards", str(tiny_shards), "--out", str(taken)])
    assert (taken / "keep.txt").read_text() == "a user's file"
    assert "must be a number >= 0" in _error(capsys, [*base, "--shards", str(tiny_shards), "--out", str(tmp_path / "n"),
                                             "--weight-decay", "-1"])

    source = tiny_shards.parent / "data"
    for count, message in ((0, "has no trusted images; build shards with --trusted-count"),
                           (1, "has no image of 2 class(es)")):
        shards = tmp_path / f"shards-{count}"
        build_shards(BuildSpec(source=str(source), out=str(shards), poison_rate=0.2, shard_size=9,
                               trusted_count=count), progress=False)
        err = _error(capsys, [*base, "--shards", str(shards), "--out", str(tmp_path / f"out-{count}")])
        assert message in err
        assert not (tmp_path / f"out-{count}").exists()


def test_the_command_without_a_penalty_uses_the_jobs_default(trained, tiny_shards, tmp_path, capsys):
    main(["refit-head", "--checkpoint", str(trained / "baseline"), "--shards", str(tiny_shards), "--out",
          str(tmp_path / "r"), *CPU])
    assert json.loads((tmp_path / "r" / "refit.json").read_text())["weight_decay"] == 0.01
    assert "weight decay 0.01 as given" in capsys.readouterr().out
