import numpy as np
import pytest
import scipy.fft
import torch

from pipeline.data.spectra import dct2, dct_matrix, normalise, spectrum


@pytest.mark.parametrize("size", [8, 32, 64, 224])
def test_torch_dct_matches_scipy(size):
    x = torch.randint(0, 256, (2, 3, size, size)).float()
    expected = scipy.fft.dctn(x.double().numpy(), type=2, axes=(-2, -1), norm="ortho")
    got = dct2(x, "torch").double().numpy()
    # relative to the largest coefficient (the DC term, up to 255 * size)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def test_non_square_and_scipy_backend_agree():
    x = torch.rand(1, 3, 16, 24) * 255
    np.testing.assert_allclose(dct2(x, "torch").numpy(), dct2(x, "scipy").numpy(), rtol=0, atol=1e-3)


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(32).double()
    torch.testing.assert_close(d @ d.T, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)


def test_spectrum_is_fp32_under_bf16_autocast():
    x = torch.randint(0, 256, (2, 3, 224, 224)).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = spectrum(x, "raw")
    assert s.dtype == torch.float32
    # the DC term of an all-255 image is 255 * H exactly; bf16 would round it
    flat = spectrum(torch.full((1, 1, 224, 224), 255.0), "raw")
    assert flat[0, 0, 0, 0].item() == pytest.approx(255 * 224, rel=1e-6)


def test_log_normalisation_is_bounded_and_odd():
    c = torch.tensor([-57120.0, -1.0, 0.0, 1.0, 57120.0])
    n = normalise(c, "log")
    torch.testing.assert_close(n, -n.flip(0))
    assert n.abs().max() < 11.0
    assert torch.isfinite(n.to(torch.float16)).all()


def test_quantize_rounds_like_uint8():
    x = torch.full((1, 1, 8, 8), 100.4)
    torch.testing.assert_close(spectrum(x, "raw"), spectrum(torch.full((1, 1, 8, 8), 100.0), "raw"))


def test_unknown_backend_and_normalisation():
    with pytest.raises(ValueError, match="unknown spectra backend"):
        dct2(torch.zeros(1, 1, 4, 4), "fftw")
    with pytest.raises(ValueError, match="unknown spectrum normalisation"):
        normalise(torch.zeros(1), "zscore")


def test_cupy_backend_needs_cuda_tensor():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        dct2(torch.zeros(1, 1, 4, 4), "cupy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["torch", "cupy"])
@pytest.mark.parametrize("size", [32, 224, 384])
def test_gpu_backends_match_scipy(backend, size):
    if backend == "cupy":
        pytest.importorskip("cupy")
    x = torch.randint(0, 256, (4, 3, size, size), device="cuda").float()
    expected = scipy.fft.dctn(x.cpu().double().numpy(), type=2, axes=(-2, -1), norm="ortho")
    got = dct2(x, backend).cpu().double().numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def test_full_fp32_matmul_works_after_the_new_tf32_api_was_used():
    from pipeline.data.spectra import full_fp32_matmul

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # as a training script would; the legacy flag now raises if touched
        with full_fp32_matmul():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
