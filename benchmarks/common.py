"""Shared by the benchmarks: device timing, the machine's description, dated JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.data.transforms import InputTransform
from pipeline.support.config import AugmentConfig

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def vit_transform(with_spectra: bool, device: torch.device, channels_last: bool = False) -> InputTransform:
    """The device input path of ViT fine-tuning: flip + random-resized crop, log spectra."""
    return InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(hflip=True, scale_min=0.08), "log", "torch",
                          with_spectra, channels_last=channels_last, device=device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_result(name: str, result: dict[str, Any], out: str | None) -> Path:
    result = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(), **result}
    path = Path(out) if out else ROOT / "docs" / "results" / f"{name}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return path
