"""Settings that depend on how the job was launched: mixed precision, per-rank seeds, DeepSpeed."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from pipeline.support.config import Config


def resolve_mixed_precision(cfg: Config, report: Callable[[str], Any]) -> str:
    """One source: ``train.mixed_precision`` when set, else the launcher's (``accelerate launch
    --mixed_precision``, which sets ACCELERATE_MIXED_PRECISION), else ``no``. A disagreement is reported."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if cfg.train.mixed_precision == "auto":
        return launcher or "no"
    if launcher and launcher != cfg.train.mixed_precision:
        report(f"warning: the launcher asks for mixed precision {launcher!r} but train.mixed_precision="
               f"{cfg.train.mixed_precision!r}, which wins; set train.mixed_precision=auto to follow the launcher")
    return cfg.train.mixed_precision


def seed_rank_randomness(seed: int, rank: int) -> None:
    """Seed the global RNGs per rank, after the model is built (identical on every rank), so dropout
    and drop-path masks differ across ranks; the data order has seeds of its own."""
    set_seed(seed + rank)


def deepspeed_input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed casts the model to bf16/fp16 and runs without autocast, so float inputs must be cast
    to match (as the Hugging Face Trainer does); None when the model keeps fp32 weights."""
    if accelerator.state.deepspeed_plugin is None:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def configure_deepspeed(deepspeed_config: dict[str, Any], cfg: Config) -> None:
    """Write what DeepSpeed takes from its own config: the micro-batch (it sizes buffers from it), the
    accumulation, and the gradient clipping (Accelerate's "auto" would put its own constant there; 0 disables)."""
    deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accumulation  # DeepSpeed's value would win
    deepspeed_config["gradient_clipping"] = cfg.optim.grad_clip


def shards_parameters(accelerator: Accelerator) -> bool:
    """ZeRO-3 and FSDP keep only a shard of each parameter on a rank, so the unwrapped module cannot run alone."""
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    return zero3 or accelerator.distributed_type == DistributedType.FSDP


def leave_process_group() -> None:
    """Destroy the default process group, if a job joined one (eval, audit, refit-head under torchrun).
    Left to the interpreter's exit, gloo's worker threads can be torn down mid-work and abort the rank
    ("terminate called without an active exception", SIGABRT); `Accelerator.end_training` does this for train."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's floating buffers (BatchNorm statistics), the ones a checkpoint and the saved model
    keep: under DDP each rank's last forward updated its own, so a rank scoring with them would score a model
    nobody saves. A no-op in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch.distributed.broadcast(buffer, src=0)
