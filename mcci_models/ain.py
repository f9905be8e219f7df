"""The Attack Indication Network: a small CNN on the image's frequency spectrum."""
from __future__ import annotations

import torch
from torch import nn

# Above this side length an AlexNet-like strided stem brings the spectrum down to about 56 px
# first, so the AIN stays a small fraction of the SFRN's FLOPs at 224 px and beyond.
STEM_THRESHOLD = 64


def _block(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    """Reference block: [conv3x3 -> ELU -> BN] x2, maxpool 2, dropout."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ELU(), nn.BatchNorm2d(c_out),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.ELU(), nn.BatchNorm2d(c_out),
        nn.MaxPool2d(2), nn.Dropout(dropout),
    )


class AttackIndicationNetwork(nn.Module):
    """Reference AIN: three blocks of 32/64/128 channels with dropout 0.2/0.3/0.4, then a linear
    layer to ``out_dim``. For images larger than 64 px an 11x11 stride-4 stem (as in AlexNet)
    comes first. An adaptive pool to 4x4 keeps the linear layer the same size at any resolution.
    """

    def __init__(self, img_size: int, in_chans: int = 3, out_dim: int = 100,
                 widths: tuple[int, ...] = (32, 64, 128), dropouts: tuple[float, ...] = (0.2, 0.3, 0.4)):
        super().__init__()
        if len(widths) != len(dropouts):
            raise ValueError("ain widths and dropouts must have the same length")
        layers: list[nn.Module] = []
        c = in_chans
        if img_size > STEM_THRESHOLD:
            layers += [nn.Conv2d(c, widths[0], 11, stride=4, padding=2), nn.ELU(), nn.BatchNorm2d(widths[0])]
            c = widths[0]
        for w, p in zip(widths, dropouts):
            layers.append(_block(c, w, p))
            c = w
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, out_dim)]
        self.net = nn.Sequential(*layers)
        self.img_size = img_size
        self.out_dim = out_dim

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        return self.net(spectra)
