"""Spectrum throughput per backend against the reference approach (scipy per image and channel).

    python -m benchmarks.spectra [--sizes 32 224] [--batch 256] [--out FILE]

Every backend is checked against float64 scipy in the same run (max error relative to the largest
coefficient) before it is timed.
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.fft
import torch

from benchmarks.common import timed, write_result
from pipeline.data.spectra import dct2, spectrum


def reference_loop(batch: np.ndarray) -> np.ndarray:
    """The reference implementation's approach: one scipy DCT per image and channel, on the CPU."""
    out = np.empty(batch.shape, np.float64)
    for i in range(batch.shape[0]):
        for c in range(batch.shape[1]):
            out[i, c] = scipy.fft.dctn(batch[i, c].astype(np.float64), norm="ortho")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reference-images", type=int, default=64, help="images the slow reference loop times")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch"] + (["cupy"] if device.type == "cuda" and _has_cupy() else [])
    rows = []
    for size in args.sizes:
        x = torch.randint(0, 256, (args.batch, 3, size, size), device=device).float()
        expected = scipy.fft.dctn(x[:8].cpu().double().numpy(), axes=(-2, -1), norm="ortho")
        ref_batch = x[: args.reference_images].cpu().numpy()
        ref_s = timed(lambda: reference_loop(ref_batch), torch.device("cpu"), warmup=1, repeat=3)
        ref_ips = args.reference_images / ref_s
        row = {"size": size, "batch": args.batch, "reference_scipy_loop_images_per_s": round(ref_ips, 1)}
        for backend in backends:
            got = dct2(x[:8], backend).cpu().double().numpy()
            row[f"{backend}_max_rel_error"] = float(np.abs(got - expected).max() / np.abs(expected).max())
            s = timed(lambda: spectrum(x, "log", backend), device)
            row[f"{backend}_images_per_s"] = round(args.batch / s, 1)
            row[f"{backend}_speedup_vs_reference"] = round(args.batch / s / ref_ips, 1)
        rows.append(row)
    write_result("spectra", {"device": device.type, "rows": rows}, args.out)


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
