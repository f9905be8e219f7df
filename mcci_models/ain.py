"""The Attack Indication Network: a small CNN on the image's frequency spectrum, and the rule that
sizes it to its SFRN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcci_models.flops import forward_flops

# Above this side length a strided stem (AlexNet's 11x11 stride 4 in the reference) brings the
# spectrum down before the blocks, so their cost does not grow with the image.
STEM_THRESHOLD = 64
REFERENCE_WIDTHS = (32, 64, 128)
MIN_WIDTH = 4
MIN_STEM_OUTPUT = 8  # px after the stem: the three 2x pools still leave a map to pool from
AIN_KINDS = ("conv", "matched", "conv+matched")


def _block(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    """Reference block: [conv3x3 -> ELU -> BN] x2, maxpool 2, dropout."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ELU(), nn.BatchNorm2d(c_out),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.ELU(), nn.BatchNorm2d(c_out),
        nn.MaxPool2d(2), nn.Dropout(dropout),
    )


def stem_output(img_size: int, stride: int) -> int:
    """Side length after a stem of ``stride`` (1: no stem)."""
    return img_size if stride == 1 else (img_size + 2 * (stride // 2) - (2 * stride + 3)) // stride + 1


def default_stem_stride(img_size: int) -> int:
    """The reference: stride 4 above ``STEM_THRESHOLD`` px, no stem (1) up to it."""
    return 4 if img_size > STEM_THRESHOLD else 1


class AttackIndicationNetwork(nn.Module):
    """Reference AIN: three blocks of 32/64/128 channels with dropout 0.2/0.3/0.4, then a linear
    layer to ``out_dim``. ``stem_stride`` > 1 puts a (2 * stride + 3)-wide strided convolution first
    (stride 4: AlexNet's 11x11, the reference above 64 px); 0 = the reference's choice for
    ``img_size``. An adaptive pool to 4x4 keeps the linear layer the same size at any resolution.

    ``kind``: ``conv`` (the reference), ``matched`` or ``conv+matched``. The matched filter is a linear read of the
    whole input averaged over a ``matched_grid``-cell grid: a trigger added to every image (a patch, a blended
    texture) shifts many spectrum coefficients a little each, which a linear function of all of them separates at once
    and the convolutions, which see a neighbourhood at a time, learn slowly; being linear in a coarse average it reads
    almost nothing of an image's class, so it does not compete with the SFRN for the task. With ``conv+matched`` the
    two outputs are summed.
    """

    def __init__(self, img_size: int, in_chans: int = 3, out_dim: int = 100,
                 widths: tuple[int, ...] = REFERENCE_WIDTHS, dropouts: tuple[float, ...] = (0.2, 0.3, 0.4),
                 stem_stride: int = 0, kind: str = "conv", matched_grid: int = 16):
        super().__init__()
        if kind not in AIN_KINDS:
            raise ValueError(f"unknown AIN kind {kind!r}; choose one of {AIN_KINDS}")
        if len(widths) != len(dropouts):
            raise ValueError("ain widths and dropouts must have the same length")
        stem_stride = stem_stride or default_stem_stride(img_size)
        layers: list[nn.Module] = []
        c = in_chans
        if stem_stride > 1:
            layers += [nn.Conv2d(c, widths[0], 2 * stem_stride + 3, stride=stem_stride, padding=stem_stride // 2),
                       nn.ELU(), nn.BatchNorm2d(widths[0])]
            c = widths[0]
        for w, p in zip(widths, dropouts):
            layers.append(_block(c, w, p))
            c = w
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, out_dim)]
        self.net = nn.Sequential(*layers) if "conv" in kind else None
        self.matched_grid = matched_grid
        self.matched = nn.Linear(in_chans * matched_grid * matched_grid, out_dim) if "matched" in kind else None
        self.img_size = img_size
        self.out_dim = out_dim

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        features = 0
        if self.net is not None:
            features = self.net(spectra)
        if self.matched is not None:
            features = features + self.matched(F.adaptive_avg_pool2d(spectra, self.matched_grid).flatten(1))
        return features


def size_ain(budget_flops: float, img_size: int, in_chans: int, out_dim: int, widths: tuple[int, ...],
             dropouts: tuple[float, ...]) -> tuple[tuple[int, ...], int, int]:
    """The AIN that fits ``budget_flops`` (forward FLOPs per image): of the candidates made by halving
    ``widths`` (to ``MIN_WIDTH`` at least) and, where the reference has a stem (above
    ``STEM_THRESHOLD`` px), by doubling its stride (while the stem leaves ``MIN_STEM_OUTPUT`` px), the
    costliest within the budget; the larger widths on a tie. Returns (widths, stem stride, its FLOPs);
    ValueError when even the smallest candidate is over the budget.

    No stem is added where the reference has none: on 32 px CIFAR-10 a strided stem lost the Blended trigger
    to the SFRN where narrower widths at full resolution, at the same cost, kept it in the AIN (docs/RESULTS.md,
    "The sized AIN on the rest of the reduced matrix")."""
    strides, stride = [], default_stem_stride(img_size)
    while stem_output(img_size, stride) >= MIN_STEM_OUTPUT:
        strides.append(stride)
        if stride == 1:
            break
        stride *= 2
    candidates, scaled = [], tuple(widths)
    while True:
        for s in strides:
            flops = forward_flops(AttackIndicationNetwork(img_size, in_chans, out_dim, scaled, dropouts, s),
                                  (1, in_chans, img_size, img_size))
            candidates.append((flops, scaled, s))
        if min(scaled) // 2 < MIN_WIDTH:
            break
        scaled = tuple(w // 2 for w in scaled)
    fitting = [c for c in candidates if c[0] <= budget_flops]
    if not fitting:
        smallest = min(candidates)
        raise ValueError(f"no AIN fits {budget_flops / 1e6:.1f} MFLOPs at {img_size} px; the smallest "
                         f"(widths {smallest[1]}, stem stride {smallest[2]}) needs {smallest[0] / 1e6:.1f}")
    flops, chosen, s = max(fitting, key=lambda c: (c[0], c[1]))
    return chosen, s, flops
