"""MCCI's training objectives, one module each, registered by name (``train.mcci_variant``), as attacks are.

A variant is the loss of one training step plus, where it needs them, hooks at the end of an epoch and
state a checkpoint keeps. ``none`` is the paper's MCCI: the fused cross-entropy. The others push what
the AIN explains out of the SFRN (docs/VARIANTS.md says why and what each scored). A new variant is a
new module here, imported below, and its name in ``train.mcci_variant``'s choices.
"""
from pipeline.components.variants.base import (VARIANTS, EpochContext, Variant, ain_warmup_loss, build_variant,
                                               plain_loss, register)
from pipeline.components.variants import agreement, independence, isolate, lff, residual  # noqa: F401  (registration)

__all__ = ["VARIANTS", "EpochContext", "Variant", "ain_warmup_loss", "build_variant", "plain_loss", "register"]
