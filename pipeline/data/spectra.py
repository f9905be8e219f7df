"""Frequency spectra for the Attack Indication Network.

The spectrum is the per-channel, full-image 2-D DCT-II with orthonormal scaling of pixel values in
0..255, computed on the exact (augmented) tensor the SFRN sees. Three backends compute the same
numbers:

- ``torch``: two matrix products per channel, ``D @ X @ D.T``, on any device (default).
- ``cupy``: ``cupyx.scipy.fft.dctn`` on a CUDA tensor through DLPack (no copy).
- ``scipy``: ``scipy.fft.dctn(norm="ortho")`` on the CPU, the correctness reference.

Spectra are always computed in fp32 with autocast and TF32 off: the DC coefficient reaches 255*H
(57,120 at 224 px), which bf16/fp16 cannot carry with useful precision. Normalisation then maps
them to a range that is safe to cast for the AIN.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch

BACKENDS = ("torch", "cupy", "scipy")
NORMALISATIONS = ("log", "raw")


@lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n), so that D @ x is scipy's dct(x, norm="ortho")."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(torch.float32)


_DEVICE_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def dct_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fp32 orthonormal DCT-II matrix of size n, cached per device."""
    device = torch.device(device)
    key = (n, device)
    if key not in _DEVICE_MATRICES:
        _DEVICE_MATRICES[key] = _dct_matrix_cpu(n).to(device)
    return _DEVICE_MATRICES[key]


def _dct2_torch(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    dh = dct_matrix(h, x.device)
    dw = dh if w == h else dct_matrix(w, x.device)
    return dh @ x @ dw.T


def _dct2_cupy(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":
        raise ValueError("spectra backend 'cupy' needs a CUDA tensor; use backend 'torch' on CPU")
    try:
        import cupy
        import cupyx.scipy.fft as cufft
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("spectra backend 'cupy' needs cupy: pip install cupy-cuda12x (or -cuda13x)") from e
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
        out = cufft.dctn(cupy.from_dlpack(x.contiguous()), type=2, axes=(-2, -1), norm="ortho")
        return torch.from_dlpack(out)


def _dct2_scipy(x: torch.Tensor) -> torch.Tensor:
    import scipy.fft

    out = scipy.fft.dctn(x.detach().cpu().double().numpy(), type=2, axes=(-2, -1), norm="ortho")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)


_BACKEND_FNS = {"torch": _dct2_torch, "cupy": _dct2_cupy, "scipy": _dct2_scipy}


def dct2(pixels: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims of a float tensor, in fp32."""
    if backend not in _BACKEND_FNS:
        raise ValueError(f"unknown spectra backend {backend!r}; choose one of {BACKENDS}")
    with torch.autocast(device_type=pixels.device.type, enabled=False):
        x = pixels.float()
        if x.device.type == "cuda":
            with full_fp32_matmul():  # TF32 keeps 10 mantissa bits: 1e-3 error
                return _BACKEND_FNS[backend](x)
        return _BACKEND_FNS[backend](x)


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """CUDA fp32 matmuls without TF32 inside, the caller's setting restored after. Uses the
    ``fp32_precision`` API where torch has it: once anything sets that, reading or writing the
    legacy ``allow_tf32`` flag raises."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # torch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def normalise(coefficients: torch.Tensor, mode: str = "log") -> torch.Tensor:
    """Map raw DCT coefficients to the AIN's input scale.

    ``log``: sign(c) * log1p(|c|), bounded by about 11 at 224 px, safe in fp16 and bf16.
    ``raw``: the coefficients unchanged, as the reference implementation feeds them (parity only).
    """
    if mode == "log":  # copysign: one elementwise pass fewer than sign(c) * log1p(|c|), same values
        return torch.copysign(torch.log1p(coefficients.abs()), coefficients)
    if mode == "raw":
        return coefficients
    raise ValueError(f"unknown spectrum normalisation {mode!r}; choose one of {NORMALISATIONS}")


def spectrum(pixels_0_255: torch.Tensor, normalisation: str = "log", backend: str = "torch",
             quantize: bool = True) -> torch.Tensor:
    """The AIN input for a batch of images [B, C, H, W] with values in 0..255.

    ``quantize`` rounds to integers first, as the reference does with its uint8 conversion, so a
    spectrum computed after float augmentation matches one computed from the stored image.
    """
    x = pixels_0_255.float()
    if quantize:
        x = x.round().clamp_(0, 255)
    return normalise(dct2(x, backend), normalisation)
