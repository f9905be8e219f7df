"""The attacker's clean model, for attacks that optimise against one (LC's adversarial
perturbations, Trojan's patch): a checkpoint of ``mcci train`` (``surrogate_checkpoint``), or one
trained here on the clean training images (``surrogate_arch`` for ``surrogate_epochs``), cached in
the shard folder's ``assets/surrogate.safetensors`` with its hash in the manifest.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from mcci_models import create_sfrn, default_device, load_saved_model
from mcci_models.saved import WEIGHTS, model_folder
from shards.attacks.base import Attack, AttackContext
from shards.errors import ShardBuildError

POOL = 4096  # clean images a universal trigger (Trojan's patch, LF's pattern) is optimised over
SURROGATE_DEFAULTS: dict[str, Any] = {"surrogate_checkpoint": None, "surrogate_arch": "resnet18_cifar",
                                      "surrogate_epochs": 10, "surrogate_max_images": 20000, "surrogate_batch": 128}


class PixelClassifier(nn.Module):
    """A classifier of [N, 3, H, W] images in [0, 1]: normalisation is inside, so attacks work in pixels."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def to_tensor(pixels: np.ndarray, dev: torch.device) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float in [0, 1]."""
    return torch.tensor(pixels, device=dev).permute(0, 3, 1, 2).float().div(255)  # a copy: PIL arrays are read-only


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def non_target_pool(attack: Attack, context: AttackContext, dev: torch.device, rng: np.random.Generator) -> torch.Tensor:
    """Up to ``POOL`` clean training images of classes other than the target, [N, 3, H, W] in [0, 1]."""
    sources = context.clean_train[context.train_labels[context.clean_train] != context.target]
    if len(sources) == 0:
        raise ShardBuildError(f"{attack.name} needs clean non-target training images to optimise its trigger")
    return to_tensor(context.pixels("train", np.sort(rng.choice(sources, size=min(len(sources), POOL), replace=False))), dev)


def _from_checkpoint(attack: Attack, context: AttackContext, dev: torch.device) -> PixelClassifier:
    checkpoint = attack.params["surrogate_checkpoint"]
    model, config, meta = load_saved_model(checkpoint, dev)
    if meta["defense"] != "none":
        raise ShardBuildError(f"surrogate_checkpoint {attack.params['surrogate_checkpoint']} is a {meta['defense']} "
                              "model; give the out folder of `mcci train train.defense=none` (a plain classifier)")
    if meta["num_classes"] != context.num_classes or meta["image_size"] != attack.image_size:
        raise ShardBuildError(f"surrogate_checkpoint has {meta['num_classes']} classes at {meta['image_size']} px; "
                              f"these shards have {context.num_classes} at {attack.image_size} px")
    attack.record_asset("surrogate_checkpoint", model_folder(checkpoint) / WEIGHTS)
    return PixelClassifier(model, config["data"]["mean"], config["data"]["std"]).to(dev).eval()


def _train(attack: Attack, context: AttackContext, dev: torch.device) -> PixelClassifier:
    p = attack.params
    rng = attack.rng(0x5A77)
    chosen = context.clean_train
    if len(chosen) > int(p["surrogate_max_images"]):
        chosen = np.sort(rng.choice(chosen, size=int(p["surrogate_max_images"]), replace=False))
    images = to_tensor(context.pixels("train", chosen), torch.device("cpu"))
    labels = torch.from_numpy(context.train_labels[chosen])
    mean, std = images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).tolist()
    torch.manual_seed(attack.seed)
    model = PixelClassifier(create_sfrn(p["surrogate_arch"], context.num_classes, attack.image_size), mean, std).to(dev)
    epochs, batch = int(p["surrogate_epochs"]), int(p["surrogate_batch"])
    steps = epochs * max(1, len(chosen) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc=f"training the surrogate ({p['surrogate_arch']})", disable=not context.progress) as bar:
        for epoch in range(epochs):
            order = torch.from_numpy(rng.permutation(len(chosen)))
            for k in range(len(chosen) // batch or 1):
                idx = order[k * batch:(k + 1) * batch]
                x, y = images[idx].to(dev), labels[idx].to(dev)
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(dev)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    context.assets_dir.mkdir(parents=True, exist_ok=True)
    path = context.assets_dir / "surrogate.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"arch": p["surrogate_arch"], "num_classes": str(context.num_classes)})
    attack.record_asset("surrogate", path)
    return model.eval()


def surrogate_classifier(attack: Attack, context: AttackContext) -> PixelClassifier:
    """The clean model the attack's parameters name, in eval mode with frozen weights."""
    dev = default_device()
    if attack.params["surrogate_checkpoint"] is not None:
        model = _from_checkpoint(attack, context, dev)
    else:
        model = _train(attack, context, dev)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
