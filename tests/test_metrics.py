import pytest
import torch

from pipeline.support.metrics import (Counts, attack_success_rate, class_accuracies, clean_accuracy,
                                      count_clean_by_class, count_triggered, defense_effectiveness_rating,
                                      recovery_accuracy)


def test_hand_built_predictions():
    labels = torch.tensor([0, 1, 2, 3])
    assert clean_accuracy(torch.tensor([0, 1, 0, 0]), labels) == 0.5
    true = torch.tensor([2, 2, 3, 1, 2])  # target 2: the three samples of class 2 are excluded
    pred = torch.tensor([2, 2, 2, 1, 0])
    assert attack_success_rate(pred, true, target=2) == 0.5
    assert recovery_accuracy(pred, true, target=2) == 0.5
    assert count_triggered(pred, true, target=2).tolist() == [1, 1, 2]


def test_accuracy_by_class_from_hand_built_predictions():
    labels = torch.tensor([0, 0, 0, 2, 2, 1])
    pred = torch.tensor([0, 1, 0, 2, 0, 0])
    counts = count_clean_by_class(pred, labels, num_classes=4)
    assert counts.tolist() == [[2, 0, 1, 0], [3, 1, 2, 0]]
    assert class_accuracies(counts + count_clean_by_class(pred, labels, 4)) == [0.6667, 0.0, 0.5, None]  # no class 3


def test_asr_respects_a_non_zero_target():
    true = torch.tensor([0, 0, 5, 5])
    pred = torch.tensor([5, 0, 5, 5])
    assert attack_success_rate(pred, true, target=5) == 0.5  # class 0 counts when the target is 5


def test_der():
    attacked = {"clean_acc": 0.90, "asr": 1.0}
    assert defense_effectiveness_rating(attacked, {"clean_acc": 0.88, "asr": 0.0}) == pytest.approx(0.99)
    assert defense_effectiveness_rating(attacked, {"clean_acc": 0.95, "asr": 1.0}) == pytest.approx(0.5)


def test_counts_round_trip_and_empty():
    c = Counts(8, 10, 1, 7, 9)
    assert Counts.from_tensor(c.as_tensor()) == c
    assert c.metrics() == {"clean_acc": 0.8, "asr": 1 / 9, "ra": 7 / 9}
    with pytest.raises(ValueError):
        Counts().metrics()
