"""FLOP counts of a forward pass, from PyTorch's own counter (matmuls and convolutions)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on zeros of ``input_shape``, on the CPU."""
    probe = copy.deepcopy(module).cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros(input_shape))
    return counter.get_total_flops()
