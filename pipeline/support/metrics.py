"""Backdoor metrics (BackdoorBench definitions), as pure functions of predictions.

All are fractions in [0, 1]. ``asr`` and ``ra`` are taken over triggered test inputs whose true
label is not the attack's target (for any target, not only class 0; for all-to-all attacks each
input's target is its label + 1 mod K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Counts:
    """Sums that add up across batches and ranks, from which the metrics follow."""

    clean_correct: int = 0
    clean_total: int = 0
    attack_hits: int = 0  # triggered, true label != target, predicted target
    recovered: int = 0  # triggered, true label != target, predicted true label
    attack_total: int = 0

    # where count_clean's and count_triggered's tensors go in as_tensor's layout
    CLEAN = slice(0, 2)
    TRIGGERED = slice(2, 5)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.clean_correct, self.clean_total, self.attack_hits, self.recovered,
                             self.attack_total], dtype=torch.long)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Counts":
        return cls(*(int(v) for v in t.tolist()))

    def metrics(self) -> dict[str, float]:
        if self.clean_total == 0 or self.attack_total == 0:
            raise ValueError("metrics need at least one clean and one triggered non-target test sample")
        return {"clean_acc": self.clean_correct / self.clean_total,
                "asr": self.attack_hits / self.attack_total,
                "ra": self.recovered / self.attack_total}


def count_clean(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[correct, total] as a long tensor on the predictions' device: summing these costs no host sync."""
    return torch.stack([pred == labels, torch.ones_like(labels, dtype=torch.bool)]).sum(1)


def count_clean_by_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[correct, total] per class of ``labels``, a long tensor [2, num_classes] on the predictions' device (a scatter,
    not boolean indexing, so no host sync)."""
    counts = torch.zeros(2, num_classes, dtype=torch.long, device=labels.device)
    counts[0].scatter_add_(0, labels, (pred == labels).long())
    counts[1].scatter_add_(0, labels, torch.ones_like(labels))
    return counts


def class_accuracies(counts: torch.Tensor) -> list[float | None]:
    """Each class's accuracy from ``count_clean_by_class``'s sums, rounded to 4 places; None for a class without
    test images."""
    correct, total = counts.tolist()
    return [round(c / t, 4) if t else None for c, t in zip(correct, total)]


def attack_targets(true_labels: torch.Tensor, target: int, mode: str = "all-to-one",
                   num_classes: int | None = None) -> torch.Tensor:
    """The label a triggered input is attacked towards: ``target``, or y + 1 mod K for all-to-all."""
    if mode == "all-to-all":
        return (true_labels + 1) % num_classes
    return torch.full_like(true_labels, target)


def count_triggered(pred: torch.Tensor, true_labels: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """[predicted target, predicted true label, total] over inputs whose true label is not their
    target (``target``: one class, or one per input), as a long tensor on the predictions' device.
    Masks, not boolean indexing: an indexed tensor's size would have to be read back from a GPU."""
    targets = torch.as_tensor(target, device=true_labels.device).expand_as(true_labels)
    keep = true_labels != targets
    return torch.stack([keep & (pred == targets), keep & (pred == true_labels), keep]).sum(1)


def clean_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    correct, total = count_clean(pred, labels).tolist()
    return correct / total


def attack_success_rate(pred: torch.Tensor, true_labels: torch.Tensor, target: int) -> float:
    hits, _, total = count_triggered(pred, true_labels, target).tolist()
    return hits / total


def recovery_accuracy(pred: torch.Tensor, true_labels: torch.Tensor, target: int) -> float:
    _, recovered, total = count_triggered(pred, true_labels, target).tolist()
    return recovered / total


def defense_effectiveness_rating(attacked: dict[str, float], defended: dict[str, float]) -> float:
    """DER = [max(0, ASR_a - ASR_d) - max(0, CA_a - CA_d) + 1] / 2, against the undefended model."""
    return (max(0.0, attacked["asr"] - defended["asr"]) - max(0.0, attacked["clean_acc"] - defended["clean_acc"]) + 1) / 2
