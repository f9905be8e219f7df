"""The variant registry and plain MCCI's objective, which every variant starts from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mcci_models.mcci import MCCIParts
from pipeline.data.batches import Batch
from pipeline.data.transforms import ModelInputs
from pipeline.support.config import Config
from pipeline.support.errors import ConfigError

VARIANTS: dict[str, type["Variant"]] = {}


def register(name: str) -> Callable[[type["Variant"]], type["Variant"]]:
    def add(cls: type["Variant"]) -> type["Variant"]:
        cls.name = name
        VARIANTS[name] = cls
        return cls
    return add


@dataclass
class EpochContext:
    """What an end-of-epoch hook may read: the unwrapped model and what the run was built with."""
    model: nn.Module
    cfg: Config
    manifest: dict[str, Any]
    transform: Any  # pipeline.data.transforms.InputTransform
    device: torch.device
    autocast: Callable[[], Any]
    step: int
    out: Path
    is_main: bool
    print: Callable[[str], None]
    log: Callable[[dict[str, float]], None]  # to the run's trackers, at this step


@register("none")
class Variant:
    """Plain MCCI: the cross-entropy of the model as trained (each input's own spectrum). Without spectra (the
    undefended baseline) the SFRN's. A mixed batch (``inputs.targets``, already smoothed by timm's Mixup) is
    scored against its soft labels."""

    name = "none"
    needs_own_labels = False  # the variant reads each sample's hard label (mixup/cutmix give soft ones)

    def __init__(self, cfg: Config):
        self.label_smoothing = cfg.optim.label_smoothing
        self.weight = cfg.train.mcci_variant_weight

    def check(self, cfg: Config, sharded: bool) -> None:
        """Refuse (``ConfigError``) a run this variant cannot train, before any work."""

    def loss(self, model: nn.Module, inputs: ModelInputs, labels: torch.Tensor,
             batch: Batch | None = None) -> torch.Tensor:
        """The step's loss; ``batch`` (its indices, and the recorded poison for diagnostics only) where a
        variant reads them."""
        if inputs.targets is not None:
            if self.needs_own_labels:
                raise ValueError(f"train.mcci_variant={self.name} needs each sample's own label; mixup/cutmix give "
                                 "soft labels")
            return self.cross_entropy(model(*self.model_args(inputs)), inputs.targets, label_smoothing=0.0)
        if inputs.spectra is None:
            return self.cross_entropy(model(inputs.images), labels)
        return self.mcci_loss(model, inputs, labels, batch)

    def mcci_loss(self, model: nn.Module, inputs: ModelInputs, labels: torch.Tensor,
                  batch: Batch | None) -> torch.Tensor:
        return self.cross_entropy(model(inputs.images, inputs.spectra), labels)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                      label_smoothing: float | None = None) -> torch.Tensor:
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction=reduction)

    @staticmethod
    def model_args(inputs: ModelInputs) -> tuple[torch.Tensor, ...]:
        return (inputs.images,) if inputs.spectra is None else (inputs.images, inputs.spectra)

    @staticmethod
    def parts(model: nn.Module, inputs: ModelInputs) -> MCCIParts:
        return model(inputs.images, inputs.spectra, return_parts=True)

    def end_of_epoch(self, context: EpochContext, epoch: int) -> None:
        """Called after each epoch's validation (``epoch`` counts from 0), before its checkpoint."""

    def state_dict(self) -> dict[str, Any] | None:
        """Plain JSON a checkpoint keeps (``trainer.json``); None when the variant has none."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None, context: EpochContext, start_epoch: int) -> None:
        """Restore from a checkpoint's ``state_dict()`` on resume."""

    def log_values(self) -> dict[str, float]:
        """Figures for ``train_log.jsonl`` at a log step (means since the last call)."""
        return {}


def scale_sfrn_gradient(parts: MCCIParts, shares: torch.Tensor) -> torch.Tensor:
    """The fused logits, unchanged in value, with each row's gradient into the SFRN's term (its features and its
    half of the head) scaled by ``shares``; the AIN's half and the bias keep theirs."""
    sfrn_term = parts.sfrn_term
    return parts.logits - (1 - shares.to(parts.logits.dtype))[:, None] * (sfrn_term - sfrn_term.detach())


class SharesByPoison:
    """A diagnostic for variants that scale the SFRN's gradient per sample: the mean share on clean and on recorded-
    poisoned samples since the last read (the shards' record of the poison never steers training)."""

    def __init__(self):
        self._sums = torch.zeros(4)  # share on clean, count clean, share on recorded-poisoned, count poisoned

    def add(self, shares: torch.Tensor, batch: Batch | None) -> None:
        if batch is None:
            return
        poisoned = batch.poisoned.to(shares.device).float()
        self._sums = self._sums.to(shares.device) + torch.stack([
            (shares * (1 - poisoned)).sum(), (1 - poisoned).sum(), (shares * poisoned).sum(), poisoned.sum()])

    def read(self) -> dict[str, float]:
        sums, self._sums = self._sums.tolist(), torch.zeros(4)
        values = {}
        if sums[1]:
            values["sfrn_share_clean"] = round(sums[0] / sums[1], 4)
        if sums[3]:
            values["sfrn_share_poisoned"] = round(sums[2] / sums[3], 4)
        return values


class SFRNGate(Variant):
    """A variant that keeps the fused cross-entropy's value and scales each sample's gradient into the SFRN by a
    share in [0, 1] (``shares``), logging the mean share on clean and recorded-poisoned samples."""

    needs_own_labels = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.share_log = SharesByPoison()

    def shares(self, parts: MCCIParts, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mcci_loss(self, model: nn.Module, inputs: ModelInputs, labels: torch.Tensor,
                  batch: Batch | None) -> torch.Tensor:
        parts = self.parts(model, inputs)
        shares = self.shares(parts, labels)
        self.share_log.add(shares, batch)
        return self.cross_entropy(scale_sfrn_gradient(parts, shares), labels)

    def log_values(self) -> dict[str, float]:
        return self.share_log.read()


def ain_warmup_loss(model: nn.Module, inputs: ModelInputs, labels: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """The AIN's warm-up (``optim.ain_warmup_epochs``), whatever the variant: the cross-entropy of the AIN's half of
    the head alone (with the bias). Nothing else can fit the labels, so the AIN takes the poison's cue."""
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    return F.cross_entropy(parts.ain_logits.float(), labels, label_smoothing=label_smoothing)


def plain_loss(model: nn.Module, inputs: ModelInputs, labels: torch.Tensor) -> torch.Tensor:
    """Plain MCCI's objective (or the baseline's) with default settings: what a step trains on unless told."""
    return Variant(Config()).loss(model, inputs, labels)


def build_variant(cfg: Config) -> Variant:
    """The objective ``train.mcci_variant`` names (plain cross-entropy for the undefended baseline)."""
    name = cfg.train.mcci_variant if cfg.train.defense == "mcci" else "none"
    if name not in VARIANTS:
        raise ConfigError(f"train.mcci_variant={name!r} is not a registered variant; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name](cfg)
