"""One way to build every network this project trains."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mcci_models.ain import AttackIndicationNetwork, size_ain
from mcci_models.flops import forward_flops
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
                 ain_dropouts: tuple[float, ...] = (0.2, 0.3, 0.4), ain_stem_stride: int = 0, in_chans: int = 3,
                 ain_kind: str = "conv", ain_matched_grid: int = 16, drop_path_rate: float = 0.0,
                 log: Callable[[str], None] = print) -> nn.Module:
    """``defense="mcci"``: SFRN + AIN + fusion; ``"none"``: the SFRN alone with a K-way head.
    ``pretrained`` and ``log``: as in ``create_sfrn``."""
    if defense == "none":
        return create_sfrn(sfrn, num_classes, img_size, pretrained, log, drop_path_rate)
    if defense != "mcci":
        raise ValueError(f"unknown defense {defense!r}; choose one of {DEFENSES}")
    return MCCI(
        sfrn=create_sfrn(sfrn, feature_dim, img_size, pretrained, log, drop_path_rate),
        ain=AttackIndicationNetwork(img_size, in_chans, feature_dim, tuple(ain_widths), tuple(ain_dropouts),
                                    ain_stem_stride, ain_kind, ain_matched_grid),
        num_classes=num_classes,
        feature_dim=feature_dim,
        spectrum_shape=(in_chans, img_size, img_size),
    )


def fit_ain(budget: float, sfrn: str, img_size: int, feature_dim: int, ain_widths: tuple[int, ...],
            ain_dropouts: tuple[float, ...], in_chans: int = 3) -> tuple[tuple[int, ...], int, str]:
    """The AIN widths and stem stride whose forward FLOPs are at most ``budget`` times the SFRN's
    (``size_ain``), and a line saying what was chosen. The networks built to be counted draw their weights from
    a forked random state, so the model built after sizing starts as one given its sizes directly would."""
    with torch.random.fork_rng(devices=[]):
        # the SFRN reads the RGB image whatever the AIN's view adds to the AIN's input (``in_chans``)
        sfrn_flops = forward_flops(create_sfrn(sfrn, feature_dim, img_size), (1, 3, img_size, img_size))
        widths, stride, flops = size_ain(budget * sfrn_flops, img_size, in_chans, feature_dim, tuple(ain_widths),
                                         tuple(ain_dropouts))
    return widths, stride, (f"AIN sized to {budget:.0%} of the SFRN's {sfrn_flops / 1e9:.3f} GFLOPs at {img_size} px: "
                            f"widths {list(widths)}, stem stride {stride}, {flops / 1e9:.4f} GFLOPs "
                            f"({flops / sfrn_flops:.1%})")
