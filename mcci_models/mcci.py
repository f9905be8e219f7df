"""The MCCI model: SFRN and AIN features, concatenated, then one linear layer.

The model owns its mind-control reference as buffers, so a saved model predicts from an image
alone: under mind control every input is shown to the AIN as clean, so the AIN's contribution is
one fixed vector, ``reference_feature``, computed once from clean data (see ``set_reference``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_KINDS = ("feature", "spectrum")


class MCCIParts(NamedTuple):
    logits: torch.Tensor  # fused: the model as trained, sfrn_term + ain_term + the head's bias
    sfrn_features: torch.Tensor
    ain_features: torch.Tensor
    sfrn_logits: torch.Tensor  # the SFRN's half of the head alone (with the bias)
    ain_logits: torch.Tensor  # the AIN's half of the head alone (with the bias)
    sfrn_term: torch.Tensor  # the SFRN's half without the bias: a gradient through it reaches the SFRN only
    ain_term: torch.Tensor  # the AIN's half without the bias


class MCCI(nn.Module):
    def __init__(self, sfrn: nn.Module, ain: nn.Module, num_classes: int, feature_dim: int,
                 spectrum_shape: tuple[int, int, int]):
        super().__init__()
        self.sfrn = sfrn
        self.ain = ain
        self.head = nn.Linear(2 * feature_dim, num_classes)
        self.register_buffer("reference_feature", torch.zeros(feature_dim))
        self.register_buffer("reference_spectrum", torch.zeros(spectrum_shape))
        self.register_buffer("has_reference", torch.zeros((), dtype=torch.bool))
        # the buffer's value as a Python bool, read by every mind-control forward without a device sync
        self.reference_ready = False
        self.register_load_state_dict_post_hook(_read_reference_flag)

    def features(self, images: torch.Tensor, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sfrn(images), self.ain(spectra)

    def fuse(self, sfrn_features: torch.Tensor, ain_features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([sfrn_features, ain_features.to(sfrn_features.dtype)], dim=1))

    def halves(self, sfrn_features: torch.Tensor, ain_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each network's half of the head alone, each with the bias: (SFRN logits, AIN logits). The head is
        linear, so the fused logits are the two halves' sum, less one bias."""
        split = sfrn_features.shape[1]
        return (F.linear(sfrn_features, self.head.weight[:, :split], self.head.bias),
                F.linear(ain_features.to(sfrn_features.dtype), self.head.weight[:, split:], self.head.bias))

    def forward(self, images: torch.Tensor, spectra: torch.Tensor | None = None,
                return_parts: bool = False) -> torch.Tensor | MCCIParts:
        """With ``spectra``: the model as trained (each input's own spectrum); ``return_parts`` also
        returns each network's features and logits alone (for the training variants; inside forward,
        so DDP, ZeRO and FSDP see every use of the head). Without ``spectra``: mind control."""
        if spectra is not None:
            sfrn_features, ain_features = self.features(images, spectra)
            if not return_parts:
                return self.fuse(sfrn_features, ain_features)
            split = sfrn_features.shape[1]
            sfrn_term = F.linear(sfrn_features, self.head.weight[:, :split])
            ain_term = F.linear(ain_features.to(sfrn_features.dtype), self.head.weight[:, split:])
            bias = self.head.bias
            return MCCIParts(sfrn_term + ain_term + bias, sfrn_features, ain_features, sfrn_term + bias,
                             ain_term + bias, sfrn_term, ain_term)
        sfrn_features = self.sfrn(images)
        return self.fuse(sfrn_features, self.mind_control_features(images.shape[0]))

    def mind_control_features(self, batch_size: int) -> torch.Tensor:
        """The AIN's output under mind control, the stored reference, for ``batch_size`` inputs."""
        if not self.reference_ready:
            raise RuntimeError("this MCCI model has no mind-control reference yet; set one with MCCI.set_reference, "
                               "or load the model folder `mcci train` saved (it holds one)")
        return self.reference_feature.expand(batch_size, -1)

    @torch.no_grad()
    def set_reference(self, kind: str, spectra: torch.Tensor) -> None:
        """Fix the mind-control reference from a batch of clean normalised spectra [N, C, H, W].

        ``spectrum``: the AIN's output on the mean spectrum (the paper's reference).
        ``feature``: the mean of the AIN's outputs on each spectrum (an input the AIN has seen;
        a mean of signed spectra is not).
        """
        if kind not in REFERENCE_KINDS:
            raise ValueError(f"unknown reference kind {kind!r}; choose one of {REFERENCE_KINDS}")
        was_training = self.ain.training
        self.ain.eval()
        mean_spectrum = spectra.float().mean(0)
        if kind == "spectrum":
            feature = self.ain(mean_spectrum[None].to(spectra.dtype))[0]
        else:
            feature = torch.cat([self.ain(chunk) for chunk in spectra.split(256)]).float().mean(0)
        self.ain.train(was_training)
        self.reference_spectrum.copy_(mean_spectrum)
        self.reference_feature.copy_(feature.float())
        self.has_reference.fill_(True)
        self.reference_ready = True


def _read_reference_flag(module: MCCI, incompatible_keys) -> None:
    """After ``load_state_dict``: mirror the loaded ``has_reference`` buffer (one read, at load time)."""
    module.reference_ready = bool(module.has_reference)
