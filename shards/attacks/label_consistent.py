"""LC, label-consistent (Turner et al. 2019): target-class images made hard to classify by PGD
against a clean model, then stamped with a 3x3 pattern in all four corners; their labels stay true.

BackdoorBench defaults: L-infinity PGD, eps 8/255, 100 steps of 1.5/255, untargeted (away from the
true label), from the image itself; the corner pattern at full amplitude. The clean model is the
surrogate (``shards/attacks/surrogate.py``). Test images get the corner pattern only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from shards.attacks.badnets import REFERENCE_PATTERN
from shards.attacks.base import Attack, AttackContext, register, to_pixels
from shards.attacks.surrogate import SURROGATE_DEFAULTS, surrogate_classifier, to_tensor, to_uint8
from shards.errors import ShardBuildError


def pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
        steps: int) -> torch.Tensor:
    """Untargeted L-infinity PGD in [0, 1] pixel space: maximise the loss of the true label."""
    adv = images.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), labels)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = (images + (adv - images).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


@register("lc")
class LabelConsistent(Attack):
    defaults = {"eps": 8 / 255, "step_size": 1.5 / 255, "steps": 100, "pattern_amplitude": 1.0,
                "pgd_batch": 256, **SURROGATE_DEFAULTS}
    clean_label = True

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if not 0 <= float(self.params["eps"]) <= 1 or int(self.params["steps"]) < 0:
            raise ShardBuildError("lc eps must be in [0, 1] (a fraction of 255) and steps >= 0")
        if image_size < 6:
            raise ShardBuildError(f"lc needs images of at least 6 px for its corner patterns, got {image_size}")
        self.adversarial: dict[int, np.ndarray] = {}
        amplitude = float(self.params["pattern_amplitude"])
        pattern = REFERENCE_PATTERN.astype(np.float64) / 255.0
        # The pattern mirrored into each corner, blended at ``amplitude`` (Turner's reduced-visibility variants).
        self.mask = np.zeros((image_size, image_size, 1))
        self.pattern = np.zeros((image_size, image_size, 1))
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                p = pattern[::-1] if flip_rows else pattern
                p = p[:, ::-1] if flip_cols else p
                rows = slice(image_size - 3, image_size) if flip_rows else slice(0, 3)
                cols = slice(image_size - 3, image_size) if flip_cols else slice(0, 3)
                self.pattern[rows, cols, 0] = p * 255.0
                self.mask[rows, cols, 0] = amplitude

    def prepare(self, context: AttackContext) -> None:
        if int(self.params["steps"]) == 0 or float(self.params["eps"]) == 0:
            return
        model = surrogate_classifier(self, context)
        dev = next(model.parameters()).device
        indices, batch = context.poisoned_train, int(self.params["pgd_batch"])
        for start in tqdm(range(0, len(indices), batch), desc="LC: PGD on target-class images",
                          disable=not context.progress):
            chunk = indices[start:start + batch]
            images = to_tensor(context.pixels("train", chunk), dev)
            labels = torch.from_numpy(context.train_labels[chunk]).to(dev)
            adv = to_uint8(pgd(model, images, labels, float(self.params["eps"]), float(self.params["step_size"]),
                               int(self.params["steps"])))
            self.adversarial.update(zip(chunk.tolist(), adv))

    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        return to_pixels((1.0 - self.mask) * image + self.mask * self.pattern)

    def apply_train(self, image: np.ndarray, index: int) -> np.ndarray:
        perturbed = int(self.params["steps"]) > 0 and float(self.params["eps"]) > 0
        if perturbed and index not in self.adversarial:
            raise ShardBuildError(f"lc has no adversarial version of training image {index}: prepare() was not run")
        return self.apply(self.adversarial[index] if perturbed else image, index)
