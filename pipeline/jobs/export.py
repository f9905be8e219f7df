"""``mcci export``: the trained classifier as a plain timm model that takes an image alone.

Under mind control the AIN contributes one fixed vector r, and the fusion head is linear, so MCCI
folds into its SFRN with a single K-way classifier. With p the SFRN's pre-logits features, (A, c) the
SFRN's classifier to ``feature_dim`` outputs, and [W_s | W_a], b the fusion head:

    logits = W_s (A p + c) + W_a r + b = (W_s A) p + (W_s c + W_a r + b)

The export is timm's own folder format (``config.json`` with the architecture, class names and
preprocessing; ``model.safetensors``), so ``timm.create_model("local-dir:EXPORT", pretrained=True)``
rebuilds it without this project (models registered here need ``import mcci_models`` first), and
``timm.data.resolve_data_config(model=...)`` gives its preprocessing. The folded model is checked
against MCCI's own mind-control forward before anything is written; it runs at the SFRN's cost.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf
from torch import nn

from mcci_models import MCCI, create_sfrn
from pipeline.components.checkpoint import replace_dir
from pipeline.components.models import load_trained
from pipeline.support.errors import JobError

TOLERANCE = 1e-4  # of the largest logit: float32 re-association of the folded products


def _classifier(model: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise JobError(f"cannot fold {arch}: its classifier is {type(classifier).__name__}, not one Linear layer")
    return next(name for name, module in model.named_modules() if module is classifier), classifier


@torch.no_grad()
def fold_mind_control(model: MCCI, arch: str, num_classes: int, image_size: int) -> nn.Module:
    """A timm ``arch`` with ``num_classes`` outputs equal to ``model``'s mind-control logits."""
    plain = create_sfrn(arch, num_classes, image_size).eval()
    prefix, source = _classifier(model.sfrn, arch)
    _, target = _classifier(plain, arch)
    body = {k: v for k, v in model.sfrn.state_dict().items() if not k.startswith(prefix + ".")}
    missing, unexpected = plain.load_state_dict(body, strict=False)
    if unexpected or set(missing) != {f"{prefix}.weight", f"{prefix}.bias"}:
        raise JobError(f"cannot fold {arch}: its body differs from the trained SFRN ({missing or unexpected})")
    features = model.reference_feature.numel()
    w = model.head.weight.double()
    w_sfrn, w_ain = w[:, :features], w[:, features:]
    target.weight.copy_(w_sfrn @ source.weight.double())
    target.bias.copy_(w_sfrn @ source.bias.double() + w_ain @ model.reference_feature.double()
                      + model.head.bias.double())
    return plain


def export(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the export folder; returns its config.json."""
    out = Path(out)
    if out.exists():
        raise JobError(f"{out} already exists; choose another --out or delete it")
    model, cfg, meta = load_trained(checkpoint, torch.device("cpu"))
    size, names = meta["image_size"], meta["class_names"]
    plain = fold_mind_control(model, cfg.model.sfrn, len(names), size) if isinstance(model, MCCI) else model
    probe = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(probe), plain(probe)  # MCCI without spectra: mind control
    error = float((expected - got).abs().max() / expected.abs().max().clamp_min(1.0))
    if error > TOLERANCE:
        raise JobError(f"the exported {cfg.model.sfrn} differs from the MCCI model by {error:.2e} (relative); "
                        "not written")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    provenance = {"defense": meta["defense"], "attack": meta["attack"], "target": meta["target"],
                  "reference": meta["reference"], "source": str(checkpoint), "max_relative_error": error}
    save_for_hf(plain, str(tmp), model_config={"label_names": names, "mcci": provenance}, safe_serialization=True,
                data_config={"input_size": (3, size, size), "mean": tuple(cfg.data.mean), "std": tuple(cfg.data.std),
                             # what `mcci shards build` does: shorter side to size (bicubic), centre crop
                             "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"})
    replace_dir(tmp, out)
    return json.loads((out / "config.json").read_text())
