"""The head-refit benchmark: its unrefitted head is the model's mind control, and a refit learns what the
features carry, the trigger included, when the poisoned samples are in its data."""
import json

import pytest
import torch

from benchmarks.head_refit import fit_head, head_refit, scores
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
                           weight, bias, weight_decay=1e-4)
    assert scores(with_poison, test, MANIFEST) == {"clean_acc": 1.0, "asr": 1.0, "ra": 0.0}
    clean_only = fit_head(torch.tensor(clean), torch.tensor([0] * 20 + [1] * 20), weight, bias, weight_decay=1e-4)
    assert scores(clean_only, test, MANIFEST) == {"clean_acc": 1.0, "asr": 0.0, "ra": 1.0}


def test_the_unrefitted_head_scores_what_mcci_eval_scores_under_mind_control(trained, tiny_shards, tmp_path):
    main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(tmp_path / "m.json"),
          "--num-workers", "0", "--device", "cpu"])
    evaluated = json.loads((tmp_path / "m.json").read_text())["mcci"]["mind_control"]
    result = head_refit(trained / "mcci", str(tiny_shards))
    as_trained = result["heads"]["mind control (as trained)"]
    assert as_trained == {k: pytest.approx(evaluated[k], abs=1e-4) for k in ("clean_acc", "asr", "ra")}
    assert list(result["heads"]) == ["mind control (as trained)", "refit on every training sample",
                                     "refit on the samples the audit does not flag", "refit on the trusted split"]
    assert result["train_samples"] == 42 and result["trusted_samples"] == 6
    assert 0 <= result["poisoned_left_unflagged"] <= 8 and 0 <= result["flagged"] <= 42
