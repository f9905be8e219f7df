"""Trojan-style patch (after Liu et al. 2018, TrojanNN): a patch inside a mask, either given
(``trigger_file``, ``mask_file``) or optimised against the attacker's clean surrogate model.

The optimised patch maximises the surrogate's log-probability of the target class over clean
non-target training images (a universal adversarial patch). TrojanNN instead optimises the patch to
excite chosen neurons and then retrains the model; a data-poisoning tool cannot retrain the victim,
so the patch is made to point at the target class from the start. The default mask is a square of
``patch_fraction`` of the side at ``position``. Stamping is the custom trigger's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from shards.attacks.base import AttackContext, register
from shards.attacks.custom import CustomTrigger
from shards.attacks.surrogate import SURROGATE_DEFAULTS, non_target_pool, surrogate_classifier, to_uint8


@register("trojan")
class Trojan(CustomTrigger):
    defaults = {**CustomTrigger.defaults, "patch_fraction": 0.2, "steps": 300, "lr": 0.1, "batch": 128,
                **SURROGATE_DEFAULTS}

    def __init__(self, params, image_size, seed):
        if params.get("trigger_file") is not None:
            super().__init__(params, image_size, seed)  # a given patch: the custom trigger
            return
        super(CustomTrigger, self).__init__(params, image_size, seed)
        size = self.params["size"] or [max(3, round(float(self.params["patch_fraction"]) * image_size))] * 2
        shape = (int(size[0]), int(size[1]))
        # Until prepare() optimises it, the patch is seeded noise (so the attack is usable without data).
        self.set_trigger(self.rng(0x7705).integers(0, 256, size=(*shape, 3)).astype(np.uint8),
                         self.mask_from_params(shape))

    def prepare(self, context: AttackContext) -> None:
        if self.params["trigger_file"] is not None or int(self.params["steps"]) == 0:
            return
        model = surrogate_classifier(self, context)
        dev = next(model.parameters()).device
        rng = self.rng(0x7706)
        pool = non_target_pool(self, context, dev, rng)
        ph, pw = self.patch.shape[:2]
        mask = torch.tensor(self.mask, dtype=torch.float32, device=dev).view(1, 1, ph, pw) * self.alpha
        logit = torch.logit(torch.tensor(self.patch, dtype=torch.float32, device=dev).permute(2, 0, 1)[None] / 255,
                            eps=1e-3).requires_grad_(True)
        optimizer = torch.optim.Adam([logit], lr=float(self.params["lr"]))
        target = torch.full((int(self.params["batch"]),), context.target, device=dev)
        r, c = self.row, self.col
        for _ in tqdm(range(int(self.params["steps"])), desc="trojan: optimising the patch", disable=not context.progress):
            chosen = torch.from_numpy(rng.choice(len(pool), size=min(len(pool), int(self.params["batch"])), replace=False))
            images = pool[chosen.to(dev)]
            window = images[:, :, r:r + ph, c:c + pw]
            stamped = images.clone()
            stamped[:, :, r:r + ph, c:c + pw] = (1 - mask) * window + mask * torch.sigmoid(logit)
            loss = F.cross_entropy(model(stamped), target[:len(chosen)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.patch = to_uint8(torch.sigmoid(logit.detach()))[0]
        context.assets_dir.mkdir(parents=True, exist_ok=True)
        path = context.assets_dir / "trojan_patch.png"
        Image.fromarray(self.patch).save(path)
        self.record_asset("trojan_patch", path)
        self.params["resolved_target_loss"] = round(loss.item(), 4)
