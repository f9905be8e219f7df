"""Refit a trained model's last linear layer, as the model predicts, on features it computes.

The layer is the one that maps features to classes: the undefended model's classifier, and MCCI's
fusion head under mind control, where the AIN's half sees one constant vector (the reference feature)
and so folds into the bias. Only the columns that read features are refitted; the constant columns stay
as trained, and the bias absorbs them both ways (``read_head``/``write_head``), so an MCCI model with a
refitted head still predicts, saves, exports and is evaluated as any other.

The fit is multinomial logistic regression with an L2 penalty on the weights, by L-BFGS from the trained
values; ``choose_weight_decay`` picks the penalty by k-fold cross-validation on the fitting set itself,
which for a small trusted split is the only held-out data there is.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mcci_models import MCCI
from pipeline.data.transforms import InputTransform
from pipeline.support.errors import JobError

Head = tuple[torch.Tensor, torch.Tensor]  # (weight [K, D], bias [K]) on the features the layer reads
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the grid cross-validation chooses from


def refit_layer(model: nn.Module) -> tuple[nn.Linear, int]:
    """The last linear layer and how many of its leading input columns are features (the rest, MCCI's AIN
    half, see the constant reference under mind control)."""
    if isinstance(model, MCCI):
        return model.head, model.reference_feature.numel()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise JobError(f"cannot refit the head of {type(model).__name__}: its classifier is "
                       f"{type(classifier).__name__}, not one Linear layer")
    return classifier, classifier.in_features


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: Iterable, transform: InputTransform,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The feature columns the last layer reads (float32, on the CPU) for every batch, as the model predicts
    (MCCI: mind control), with each sample's labels, true labels and index; ``constant``: the inputs of the
    columns that do not vary (empty for an undefended model)."""
    layer, width = refit_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float().cpu()))
    parts: dict[str, list[torch.Tensor]] = {"labels": [], "orig_labels": [], "indices": []}
    try:
        for batch in batches:
            model(transform(batch.images.to(device), train=False).images)
            parts["labels"].append(batch.labels)
            parts["orig_labels"].append(batch.orig_labels)
            parts["indices"].append(batch.indices)
    finally:
        handle.remove()
    if not captured:
        raise JobError("no samples to read features from")
    inputs = torch.cat(captured)
    return {"features": inputs[:, :width], "constant": inputs[0, width:], **{k: torch.cat(v) for k, v in parts.items()}}


def read_head(layer: nn.Linear, width: int, constant: torch.Tensor) -> Head:
    """The layer as a map from its feature columns alone: the constant columns folded into the bias."""
    weight = layer.weight.detach().float().cpu()
    return weight[:, :width].clone(), layer.bias.detach().float().cpu() + weight[:, width:] @ constant


@torch.no_grad()
def write_head(layer: nn.Linear, width: int, constant: torch.Tensor, head: Head) -> None:
    """Set the layer so that it computes ``head`` on its feature columns, the constant columns as they were."""
    weight, bias = head
    layer.weight[:, :width].copy_(weight)
    layer.bias.copy_(bias - layer.weight[:, width:].detach().float().cpu() @ constant)


def fit_head(features: torch.Tensor, labels: torch.Tensor, start: Head, weight_decay: float,
             steps: int = 300) -> Head:
    """Multinomial logistic regression from ``start``, L2 ``weight_decay`` on the weights, by L-BFGS."""
    w, b = (t.clone().requires_grad_() for t in start)
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(features @ w.T + b, labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach(), b.detach()


def accuracy(head: Head, features: torch.Tensor, labels: torch.Tensor) -> float:
    weight, bias = head
    return float(((features @ weight.T + bias).argmax(1) == labels).float().mean())


def choose_weight_decay(features: torch.Tensor, labels: torch.Tensor, start: Head,
                        grid: tuple[float, ...] = WEIGHT_DECAYS, folds: int = 5,
                        seed: int = 0) -> tuple[float, dict[float, float]]:
    """The penalty of ``grid`` with the best k-fold held-out accuracy (ties: the stronger penalty, the
    safer refit), and each penalty's accuracy."""
    folds = min(folds, len(labels))
    if folds < 2:
        raise JobError(f"{len(labels)} sample(s) cannot be cross-validated; give a weight decay or more samples")
    fold_of = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) % folds
    held_out_accuracy = {}
    for decay in grid:
        correct = 0.0
        for k in range(folds):
            held = fold_of == k
            head = fit_head(features[~held], labels[~held], start, decay)
            correct += accuracy(head, features[held], labels[held]) * int(held.sum())
        held_out_accuracy[decay] = correct / len(labels)
    best = max(grid, key=lambda decay: (held_out_accuracy[decay], decay))
    return best, held_out_accuracy
