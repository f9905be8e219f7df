"""Validation while training: CA / ASR / RA of the weights as they train (and of their EMA), so
a run shows when the attack lands and whether mind control holds, epoch by epoch."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mcci_models import MCCI
from pipeline.components.distributed import broadcast_buffers_from_main
from pipeline.components.evaluation import evaluate, set_model_reference
from pipeline.data.storage import StreamOptions
from pipeline.data.transforms import InputTransform
from pipeline.support.config import Config

VAL_LOG = "val_log.jsonl"


def validate(model: nn.Module, cfg: Config, manifest: dict[str, Any], transform: InputTransform,
             device: torch.device, autocast: Callable[[], Any], reduce: Callable[[torch.Tensor], torch.Tensor],
             parts: dict[str, float] | None = None, stream: StreamOptions | None = None) -> dict[str, dict[str, float]]:
    """Metrics per inference mode (``plain``, or MCCI's ``own`` and ``mind_control``) of an unwrapped
    model, counted across ranks, with rank 0's BatchNorm statistics (those the saved model keeps). MCCI's mind
    control uses a reference computed now from ``cfg.reference`` (the model's final one is fixed after training);
    ``parts`` is filled as ``evaluate`` fills it; ``stream``: how the shards are read (default: ``cfg.data``'s way;
    the training job gives its own, whose tally counts what validation skips). The model is left in eval mode."""
    broadcast_buffers_from_main(model)
    stream = stream or StreamOptions.from_config(cfg.data)
    if isinstance(model, MCCI):
        r = cfg.reference
        with autocast():  # DeepSpeed's bf16/fp16 weights take the fp32 spectra only under autocast
            set_model_reference(model, cfg.data.shards, manifest, r.kind, r.source, r.count, transform, device, stream)
    results = evaluate(model, cfg.data.shards, manifest, transform, device, cfg.data.eval_batch_size,
                       cfg.data.num_workers, reduce=reduce, autocast=autocast, stream=stream, parts=parts)
    return results if isinstance(model, MCCI) else {"plain": results}


def describe(epoch: int, weights: str, results: dict[str, dict[str, float]]) -> str:
    """One line for the console: each mode's CA / ASR / RA."""
    modes = " | ".join(f"{mode.replace('_', ' ')} CA {m['clean_acc']:.3f} ASR {m['asr']:.3f} RA {m['ra']:.3f}"
                       for mode, m in results.items())
    return f"epoch {epoch} validation ({weights} weights): {modes}"
