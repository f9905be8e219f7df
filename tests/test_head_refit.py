"""The head-refit benchmark: its unrefitted head is the model's mind control, and a refit learns what the
features carry, the trigger included, when the poisoned samples are in its data."""
import json

import pytest
import torch

from benchmarks.head_refit import head_refit, scores
from pipeline.components.head_refit import fit_head, read_head, refit_layer
from pipeline.cli import main

MANIFEST = {"target": 0, "mode": "all-to-one", "num_classes": 2}


def _split(features: list[list[float]], labels: list[int], orig_labels: list[int]) -> dict[str, torch.Tensor]:
    return {"features": torch.tensor(features), "labels": torch.tensor(labels),
            "orig_labels": torch.tensor(orig_labels)}


def test_a_refit_on_poisoned_samples_learns_the_trigger_the_trained_head_ignored():
    # feature 0: the class (-1 / +1); feature 1: a trigger. The trained head reads the class only.
    clean = [[-1.0, 0.0]] * 20 + [[1.0, 0.0]] * 20
    poisoned = [[1.0, 1.0]] * 8  # class-1 images with the trigger, labelled with the target 0
    weight, bias = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.zeros(2)
    test = {"test-clean": _split([[-1.0, 0.0], [1.0, 0.0]], [0, 1], [0, 1]),
            # the last triggered input is of the target class: ASR and RA leave it out
            "test-poisoned": _split([[1.0, 1.0]] * 3 + [[-1.0, 1.0]], [0] * 4, [1, 1, 1, 0])}
    assert scores((weight, bias), test, MANIFEST) == {"clean_acc": 1.0, "asr": 0.0, "ra": 1.0}

    with_poison = fit_head(torch.tensor(clean + poisoned), torch.tensor([0] * 20 + [1] * 20 + [0] * 8),
                           (weight, bias), weight_decay=1e-4)
    assert scores(with_poison, test, MANIFEST) == {"clean_acc": 1.0, "asr": 1.0, "ra": 0.0}
    clean_only = fit_head(torch.tensor(clean), torch.tensor([0] * 20 + [1] * 20), (weight, bias), weight_decay=1e-4)
    assert scores(clean_only, test, MANIFEST) == {"clean_acc": 1.0, "asr": 0.0, "ra": 1.0}


def test_the_unrefitted_head_is_mind_control_and_scores_what_mcci_eval_scores(trained, tiny_shards, tmp_path):
    from pipeline.components.models import load_trained

    model, _, _ = load_trained(trained / "mcci", torch.device("cpu"))
    images = torch.randn(5, 3, 32, 32)
    layer, width = refit_layer(model)
    weight, bias = read_head(layer, width, model.reference_feature)
    with torch.no_grad():
        assert torch.allclose(model.sfrn(images) @ weight.T + bias, model(images), atol=1e-5)

    main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(tmp_path / "m.json"),
          "--num-workers", "0", "--device", "cpu"])
    evaluated = json.loads((tmp_path / "m.json").read_text())["mcci"]["mind_control"]
    main(["audit", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(tmp_path / "audit"),
          "--num-workers", "0", "--device", "cpu"])
    audited = json.loads((tmp_path / "audit" / "audit.json").read_text())
    result = head_refit(trained / "mcci", str(tiny_shards))
    assert result["heads"]["mind control (as trained)"] == {k: pytest.approx(evaluated[k], abs=1e-4)
                                                          for k in ("clean_acc", "asr", "ra")}
    assert list(result["heads"]) == ["mind control (as trained)", "refit on every training sample",
                                     "refit on the samples the audit does not flag", "refit on the trusted split"]
    assert (result["train_samples"], result["trusted_samples"]) == (42, 6)
    assert result["flagged"] == audited["flagged"]
    recorded = audited["recorded_poisoned"]
    assert result["poisoned"] == recorded["count"]
    assert result["poisoned_left_unflagged"] == recorded["count"] - recorded["flagged"]
