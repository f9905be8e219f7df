"""The Semantic Feature Recognition Network: any timm model, pretrained from the hub or a file.

Besides timm's own models this registers two small backbones for 32 px data with timm's
``@register_model``, so ``timm.create_model`` stays the one way to build every SFRN.

Pretrained weights go through timm's own loading and are then checked tensor by tensor against
their source: timm drops the classifier and loads the rest with ``strict=False`` when the number of
classes differs, so a renamed or absent backbone tensor would otherwise stay random without a word.
"""
from __future__ import annotations

import difflib
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import timm
import torch
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

PRETRAINED_HELP = "model.pretrained takes none, hub (timm's hub, needs the network) or a weights file path"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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


class PreActBlock(nn.Module):
    """A pre-activation basic block (He et al., ECCV 2016): BN-ReLU before each 3x3 convolution; the
    projection shortcut, where the shape changes, takes the pre-activated input."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False)
                         if stride != 1 or in_chans != out_chans else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(activated)
        return self.conv2(torch.relu(self.bn2(self.conv1(activated)))) + skip


class PreActResNet18(nn.Module):
    """The pre-activation ResNet-18 of BackdoorBench's CIFAR-10 tables (3x3 stem, four stages of two
    blocks, 64-512 channels, no BN-ReLU before the pooling, as theirs), so defence figures compare."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, **_: object):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        stages, c = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(c, width, stride), PreActBlock(width, width, 1)))
            c = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features, self.num_classes = c, num_classes
        self.fc = nn.Linear(c, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(self.pool(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


# timm's pretrained configs (input size, normalisation, classifier name): they travel with an export
# (`mcci export`), and they let timm reload these models from a local folder. No hub weights exist, so
# there are no pretraining statistics: mean and std are the 0.5 an unset data.mean/std meant before it
# came from here, so the quickstart and every run that left them unset keep their figures.
_CIFAR_CFG = dict(input_size=(3, 32, 32), pool_size=None, crop_pct=1.0, interpolation="bicubic",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
default_cfgs = generate_default_cfgs({
    "mcci_convnet_small": dict(**_CIFAR_CFG, first_conv="features.0", classifier="head"),
    "mcci_convnet_tiny": dict(**_CIFAR_CFG, first_conv="features.0", classifier="head"),
    "resnet18_cifar": dict(**_CIFAR_CFG, first_conv="conv1", classifier="fc"),
    "preact_resnet18": dict(**_CIFAR_CFG, first_conv="conv1", classifier="fc"),
})


def _build(cls: type, name: str, pretrained: bool, **kwargs) -> nn.Module:
    source = {**(kwargs.get("pretrained_cfg") or {}), **(kwargs.get("pretrained_cfg_overlay") or {})}
    if pretrained and not source.get("file"):
        raise ModelError(f"{name} has no pretrained weights on the hub; set model.pretrained=none or give a "
                         "weights file path")
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


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet18:
    """BackdoorBench's PreAct-ResNet18 for 32 px images: 11.2M parameters, 0.56 G multiply-adds at 32 px."""
    return _build(PreActResNet18, "preact_resnet18", pretrained, **kwargs)


def _check_name(name: str) -> None:
    if name not in timm.list_models() and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"unknown timm model {name!r}; similar names: {close or 'none'} (see timm.list_models())")


def _timm_model(name: str, num_outputs: int, img_size: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        # Resolution-aware models (ViT, DeiT, EVA, ...) take img_size and resample position
        # embeddings when loading pretrained weights; convolutional models do not take it.
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_outputs, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_outputs, **kwargs)
    # a model that takes the rate but has no stochastic depth would train without it, unsaid
    if kwargs.get("drop_path_rate") and not any(getattr(m, "drop_prob", 0) > 0 for m in model.modules()):
        raise ModelError(f"{name} has no stochastic depth (drop path); set model.drop_path_rate=0")
    return model


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Same seed, same initial tensors: lets the check rebuild a model's initial state on demand."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _weights_path(pretrained: str) -> Path:
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} does not exist; {PRETRAINED_HELP}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"model.pretrained: {path} must end in one of {WEIGHT_SUFFIXES} ({PRETRAINED_HELP}; "
                         "`mcci weights import` converts EfficientNet-Lite0's .pth)")
    return path


def _names(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_loaded(model: nn.Module, source: Mapping[str, torch.Tensor],
                 initial: Callable[[], Mapping[str, torch.Tensor]]) -> list[str]:
    """Refuse (one ``ModelError`` line naming the keys) unless every backbone tensor of ``model``
    holds the value ``source`` gives it and every source tensor has a place in ``model``; returns
    the classifier-head keys left re-initialised.

    A tensor whose shape differs from the source's was adapted by timm (a ViT's position embeddings
    at another input size): it must then differ from its initial value, which ``initial()`` rebuilds.
    """
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = model.state_dict()
    missing, differ, adapted, head = [], [], [], []
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):  # a BatchNorm step counter, not a weight
            continue
        given = source.get(key)
        if given is not None and given.shape == tensor.shape and torch.equal(given.to(tensor.dtype), tensor):
            continue
        if any(key.startswith(h + ".") for h in heads):
            head.append(key)
        elif given is None:
            missing.append(key)
        elif given.shape == tensor.shape:
            differ.append(key)
        else:
            adapted.append(key)
    start = initial() if adapted else {}
    stuck = [k for k in adapted if torch.equal(start[k], state[k])]
    # Tensors the model has no place for: weights of a larger relative (resnet34's into a resnet18).
    unused = [k for k in source if k not in state and not any(k.startswith(h + ".") for h in heads)]
    problems = [f"{what}: {_names(keys)}" for what, keys in (("missing from the weights", missing),
                                                              ("not loaded (differ from the weights)", differ),
                                                              ("left at their initial value", stuck),
                                                              ("in the weights but not in the model", unused)) if keys]
    if problems:
        raise ModelError(f"pretrained weights do not fill {type(model).__name__}: {'; '.join(problems)} "
                         "(only the classifier head may be re-initialised; use weights of this architecture)")
    return head


def _source_state(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """The tensors timm loaded from: the hub weights at their own head size, or the file."""
    if pretrained == "hub":
        return timm.create_model(name, pretrained=True).state_dict()
    return timm.models.load_state_dict(pretrained, weights_only=True)


def create_sfrn(name: str, num_outputs: int, img_size: int, pretrained: str = "none",
                log: Callable[[str], None] = print, drop_path_rate: float = 0.0) -> nn.Module:
    """Build a timm backbone whose head outputs ``num_outputs`` values.

    ``pretrained``: ``"none"``, ``"hub"`` (timm's hub loading) or a weights file (safetensors, or a
    torch state dict read with ``weights_only=True``), loaded by timm with the head and, for ViTs,
    the position embeddings adapted to ``num_outputs`` and ``img_size``, then checked tensor by
    tensor (``check_loaded``); ``log`` receives the one line saying what was loaded.
    """
    _check_name(name)
    # only when asked: the project's own small CNNs have no stochastic depth to set
    depth = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
    if pretrained == "none":
        return _timm_model(name, num_outputs, img_size, pretrained=False, **depth)
    kwargs = {**depth, **({} if pretrained == "hub" else {"pretrained_cfg_overlay": {"file": str(_weights_path(pretrained))}})}
    seed = int(torch.randint(2**62, ()))  # drawn from the run's generator: train.seed still decides the head
    try:
        with _seeded(seed):
            model = _timm_model(name, num_outputs, img_size, pretrained=True, **kwargs)
        source = _source_state(name, pretrained)
    except (RuntimeError, pickle.UnpicklingError, KeyError, OSError, SafetensorError) as e:
        shapes = re.findall(r"size mismatch for ([\w.]+)", str(e))
        if shapes:
            why, fix = f"shapes differ for {_names(shapes)}", "use weights of this architecture"
        elif isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            # timm loads .pth/.bin with torch.load(weights_only=True): pickled code is refused, never run.
            why, fix = str(e).splitlines()[0], "a pickle that needs code to load is refused; save the weights as .safetensors"
        else:
            why = str(e).splitlines()[0]
            fix = ("it needs the network or a filled Hugging Face cache; give a weights file path" if pretrained == "hub"
                   else "give a .safetensors file or a .pth state dict of this architecture")
        raise ModelError(f"model.pretrained={pretrained} cannot be loaded into {name}: {why} ({fix})") from e

    def initial() -> dict[str, torch.Tensor]:
        with _seeded(seed):
            return _timm_model(name, num_outputs, img_size, pretrained=False, **depth).state_dict()

    head = check_loaded(model, source, initial)
    loaded = sum(1 for k in model.state_dict() if k not in head and not k.endswith("num_batches_tracked"))
    log(f"SFRN {name}: {loaded} tensors loaded from {pretrained} and checked against it"
        + (f"; classifier head ({', '.join(head)}) re-initialised for {num_outputs} outputs" if head else ""))
    return model


def sfrn_data_config(name: str) -> dict[str, Any]:
    """The input the SFRN's pretrained weights expect (timm's ``resolve_model_data_config``: mean,
    std, interpolation, crop_pct, crop_mode, input_size), built on the meta device: no weights."""
    _check_name(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    return timm.data.resolve_model_data_config(model)
