"""The Semantic Feature Recognition Network: any timm model, pretrained from the hub or a file.

Besides timm's own models this registers two small backbones for 32 px data with timm's
``@register_model``, so ``timm.create_model`` stays the one way to build every SFRN.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class SmallConvNet(nn.Module):
    """A 4-stage VGG-style CNN (two 3x3 convs a stage, about 1.2M parameters) for 32 px images:
    the quickstart's SFRN."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256),
                 **_: object):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for i, w in enumerate(widths):
            for c_in in (c, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c
        self.head = nn.Linear(c, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set model.pretrained=false")


@register_model
def mcci_convnet_small(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """32/64/128/256 channels: 1.2M parameters, 0.11 GFLOPs at 32 px."""
    _no_pretrained("mcci_convnet_small", pretrained)
    return SmallConvNet(**kwargs)


@register_model
def mcci_convnet_tiny(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """16/32/64/128 channels: 0.3M parameters, 0.03 GFLOPs at 32 px (the CPU quickstart)."""
    _no_pretrained("mcci_convnet_tiny", pretrained)
    return SmallConvNet(widths=(16, 32, 64, 128), **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the 3x3 stride-1 stem and no max-pool, the usual CIFAR variant."""
    _no_pretrained("resnet18_cifar", pretrained)
    # timm passes its own keys (pretrained_cfg, ...) to every entry point; ResNet takes few of them.
    args = {k: kwargs[k] for k in ("num_classes", "in_chans", "drop_rate") if k in kwargs}
    model = ResNet(BasicBlock, [2, 2, 2, 2], **args)
    model.conv1 = nn.Conv2d(args.get("in_chans", 3), 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def create_sfrn(name: str, num_outputs: int, img_size: int, pretrained: bool = False,
                weights_file: str | None = None) -> nn.Module:
    """Build a timm backbone whose head outputs ``num_outputs`` values.

    ``pretrained`` loads weights from the hub; ``weights_file`` (safetensors, npz or a torch state
    dict) loads them from a local file through timm's own loader, with the head and, for ViTs, the
    position embeddings adapted to ``num_outputs`` and ``img_size``.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close or 'none'} (see timm.list_models())")
    kwargs: dict = {"num_classes": num_outputs}
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights_file {path} does not exist; give a local .safetensors/.npz/.pth file")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"model.weights_file {path} must end in one of {WEIGHT_SUFFIXES}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        # Resolution-aware models (ViT, DeiT, EVA, ...) take img_size and resample position
        # embeddings when loading pretrained weights; convolutional models do not take it.
        return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
