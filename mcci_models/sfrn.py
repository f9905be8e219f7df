"""The Semantic Feature Recognition Network: any timm model, pretrained from the hub or a file.

Besides timm's own models this registers two small backbones for 32 px data with timm's
``@register_model``, so ``timm.create_model`` stays the one way to build every SFRN.
"""
from __future__ import annotations

import difflib
import pickle
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class ModelError(ValueError):
    """A model that cannot be built as asked: unknown name, missing or unsafe weights."""


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
        self.num_features, self.num_classes = c, num_classes
        self.head = nn.Linear(c, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


class CifarResNet(ResNet):
    """ResNet with the 3x3 stride-1 stem and no max-pool, the usual CIFAR variant."""

    def __init__(self, in_chans: int = 3, **kwargs: object):
        super().__init__(in_chans=in_chans, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()


# timm's pretrained configs (input size, normalisation, classifier name): they travel with an export
# (`mcci export`), and they let timm reload these models from a local folder. No hub weights exist.
_CIFAR_CFG = dict(input_size=(3, 32, 32), pool_size=None, crop_pct=1.0, interpolation="bicubic",
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
default_cfgs = generate_default_cfgs({
    "mcci_convnet_small": dict(**_CIFAR_CFG, first_conv="features.0", classifier="head"),
    "mcci_convnet_tiny": dict(**_CIFAR_CFG, first_conv="features.0", classifier="head"),
    "resnet18_cifar": dict(**_CIFAR_CFG, first_conv="conv1", classifier="fc"),
})


def _build(cls: type, name: str, pretrained: bool, **kwargs) -> nn.Module:
    source = {**(kwargs.get("pretrained_cfg") or {}), **(kwargs.get("pretrained_cfg_overlay") or {})}
    if pretrained and not source.get("file"):
        raise ModelError(f"{name} has no pretrained weights on the hub; set model.pretrained=false or give "
                         "model.weights_file")
    return build_model_with_cfg(cls, name, pretrained, **kwargs)


@register_model
def mcci_convnet_small(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """32/64/128/256 channels: 1.2M parameters, 0.11 GFLOPs at 32 px."""
    return _build(SmallConvNet, "mcci_convnet_small", pretrained, **kwargs)


@register_model
def mcci_convnet_tiny(pretrained: bool = False, **kwargs) -> SmallConvNet:
    """16/32/64/128 channels: 0.3M parameters, 0.03 GFLOPs at 32 px (the CPU quickstart)."""
    return _build(SmallConvNet, "mcci_convnet_tiny", pretrained, widths=(16, 32, 64, 128), **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the 3x3 stride-1 stem and no max-pool, the usual CIFAR variant."""
    return _build(CifarResNet, "resnet18_cifar", pretrained, block=BasicBlock, layers=[2, 2, 2, 2], **kwargs)


def create_sfrn(name: str, num_outputs: int, img_size: int, pretrained: bool = False,
                weights_file: str | None = None) -> nn.Module:
    """Build a timm backbone whose head outputs ``num_outputs`` values.

    ``pretrained`` loads weights from the hub; ``weights_file`` (safetensors, npz or a torch state
    dict) loads them from a local file through timm's own loader, with the head and, for ViTs, the
    position embeddings adapted to ``num_outputs`` and ``img_size``.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"unknown timm model {name!r}; similar names: {close or 'none'} (see timm.list_models())")
    kwargs: dict = {"num_classes": num_outputs}
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.weights_file {path} does not exist; give a local .safetensors/.npz/.pth file")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ModelError(f"model.weights_file {path} must end in one of {WEIGHT_SUFFIXES}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        try:
            # Resolution-aware models (ViT, DeiT, EVA, ...) take img_size and resample position
            # embeddings when loading pretrained weights; convolutional models do not take it.
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, KeyError) as e:
        if weights_file is None:
            raise
        # timm loads .pth/.bin with torch.load(weights_only=True): pickled code is refused, never run.
        raise ModelError(f"model.weights_file {weights_file} cannot be loaded into {name}: {str(e).splitlines()[0]} "
                         "(a pickle that needs code to load is refused; save the weights as .safetensors)") from e
