"""Shared by the benchmarks: device timing, machine description, JSON + dated RESULTS.md lines."""
from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    import os

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def timed(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_result(name: str, result: dict[str, Any], out: str | None) -> Path:
    result = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(), **result}
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"{name}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return path
