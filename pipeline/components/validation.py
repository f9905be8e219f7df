"""Validation while training: CA / ASR / RA of the weights as they train (and of their EMA), so
a run shows when the attack lands and whether mind control holds, epoch by epoch."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mcci_models import MCCI
from pipeline.components.distributed import broadcast_buffers_from_main
from pipeline.components.evaluation import evaluate_models, reference_spectra
from pipeline.data.storage import StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.config import Config

VAL_LOG = "val_log.jsonl"


def validate(models: dict[str, nn.Module], cfg: Config, manifest: dict[str, Any], transform: InputTransform,
             device: torch.device, autocast: Callable[[], Any], reduce: Callable[[torch.Tensor], torch.Tensor],
             parts: dict[str, dict[str, float]] | None = None,
             stream: StreamOptions | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics per inference mode (``plain``, or MCCI's ``own`` and ``mind_control``) of each unwrapped model (a
    run's raw weights and its EMA), counted across ranks, with rank 0's BatchNorm statistics (those the saved model
    keeps), in one pass over the test splits. MCCI's mind control uses a reference computed now from
    ``cfg.reference`` (the model's final one is fixed after training), its spectra read once for every model;
    ``parts`` is filled per model as ``evaluate_models`` fills it; ``stream``: how the shards are read (default:
    ``cfg.data``'s way; the training job gives its own, whose tally counts what validation skips). The models are
    left in eval mode."""
    stream = stream or StreamOptions.from_config(cfg.data)
    for model in models.values():
        broadcast_buffers_from_main(model)
    mcci = [model for model in models.values() if isinstance(model, MCCI)]
    if mcci:
        r = cfg.reference
        spectra, _ = reference_spectra(cfg.data.shards, manifest, r.source, r.count, transform, device, stream=stream)
        with autocast():  # DeepSpeed's bf16/fp16 weights take the fp32 spectra only under autocast
            for model in mcci:
                model.set_reference(r.kind, spectra)
    results = evaluate_models(models, cfg.data.shards, manifest, transform, device, cfg.data.eval_batch_size,
                              cfg.data.num_workers, reduce=reduce, autocast=autocast, stream=stream, parts=parts)
    return {name: figures if isinstance(models[name], MCCI) else {"plain": figures} for name, figures in results.items()}


def describe(epoch: int, weights: str, results: dict[str, dict[str, float]]) -> str:
    """One line for the console: each mode's CA / ASR / RA."""
    modes = " | ".join(f"{mode.replace('_', ' ')} CA {m['clean_acc']:.3f} ASR {m['asr']:.3f} RA {m['ra']:.3f}"
                       for mode, m in results.items())
    return f"epoch {epoch} validation ({weights} weights): {modes}"
