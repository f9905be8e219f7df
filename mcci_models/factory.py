"""One way to build every network this project trains."""
from __future__ import annotations

from typing import Callable

from torch import nn

from mcci_models.ain import AttackIndicationNetwork
from mcci_models.mcci import MCCI
from mcci_models.sfrn import create_sfrn

DEFENSES = ("mcci", "none")
# What the AIN sees (``model.ain_view``): the image's spectrum alone, or with a low-passed copy of the image
# beside it (pipeline/data/transforms.py computes both), channels stacked.
AIN_VIEWS = ("spectrum", "spectrum+lowpass")


def ain_in_chans(view: str, image_chans: int = 3) -> int:
    """Channels of the AIN's input for ``view``: the spectrum's (one per image channel), and as many again
    for the low-pass image."""
    if view not in AIN_VIEWS:
        raise ValueError(f"unknown AIN view {view!r}; choose one of {AIN_VIEWS}")
    return image_chans * (2 if view == "spectrum+lowpass" else 1)


def create_model(defense: str, sfrn: str, num_classes: int, img_size: int, *, pretrained: str = "none",
                 feature_dim: int = 100, ain_widths: tuple[int, ...] = (32, 64, 128),
                 ain_dropouts: tuple[float, ...] = (0.2, 0.3, 0.4), in_chans: int = 3,
                 log: Callable[[str], None] = print) -> nn.Module:
    """``defense="mcci"``: SFRN + AIN + fusion; ``"none"``: the SFRN alone with a K-way head.
    ``pretrained`` and ``log``: as in ``create_sfrn``."""
    if defense == "none":
        return create_sfrn(sfrn, num_classes, img_size, pretrained, log)
    if defense != "mcci":
        raise ValueError(f"unknown defense {defense!r}; choose one of {DEFENSES}")
    return MCCI(
        sfrn=create_sfrn(sfrn, feature_dim, img_size, pretrained, log),
        ain=AttackIndicationNetwork(img_size, in_chans, feature_dim, tuple(ain_widths), tuple(ain_dropouts)),
        num_classes=num_classes,
        feature_dim=feature_dim,
        spectrum_shape=(in_chans, img_size, img_size),
    )
