import math
import random

import pytest
import torch

from pipeline.data.transforms import InputTransform, affine_theta, augment
from pipeline.support.config import AugmentConfig


def test_no_augmentation_is_identity():
    x = torch.rand(3, 3, 8, 8) * 255
    assert torch.equal(augment(x, AugmentConfig(hflip=False)), x)


def test_flip_only_gives_exact_mirrors():
    x = torch.rand(16, 3, 8, 8) * 255
    out = augment(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))
    for i in range(16):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert not all(torch.equal(out[i], x[i]) for i in range(16))


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x moved right by dx and down by dy whole pixels, zeros where it uncovers."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_translate_is_a_whole_pixel_shift_with_zero_fill():
    x = torch.arange(1, 1 + 64, dtype=torch.float32).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    out = augment(x, AugmentConfig(hflip=False, translate=0.25), torch.Generator().manual_seed(1))
    shifts = []
    for i in range(64):  # each output is the image moved by one whole (dx, dy), every pixel alike
        found = [(dx, dy) for dx in range(-7, 8) for dy in range(-7, 8) if torch.equal(out[i], _shifted(x[i], dx, dy))]
        assert len(found) == 1, i
        shifts += found
    dx, dy = zip(*shifts)
    assert set(dx) == set(dy) == {-2, -1, 0, 1, 2}  # up to translate * side = 2 pixels each way


def test_transform_outputs_and_seeded_state():
    t = InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(), "log", "torch", with_spectra=True, seed=3)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    state = t.state_dict()
    a = t(images, train=True)
    t.load_state_dict(state)
    b = t(images, train=True)
    assert torch.equal(a.images, b.images) and torch.equal(a.spectra, b.spectra)
    plain = t(images, train=False)
    torch.testing.assert_close(plain.images, images.float() / 127.5 - 1)
    assert InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(), "log", "torch", False)(images, False).spectra is None


def _jpeg_and_png_shards(tmp_path):
    from shards.build import BuildSpec, build_shards

    from conftest import make_image_tree

    data = make_image_tree(tmp_path / "data", classes=2, per_class=6, test_per_class=3)
    built = {}
    for fmt in ("png", "jpeg"):
        out = tmp_path / fmt
        build_shards(BuildSpec(source=str(data), out=str(out), poison_rate=0.2, image_format=fmt, trusted_count=0,
                               shard_size=5), progress=False)
        built[fmt] = out
    return built


def test_device_decode_gives_the_pixels_worker_decode_gives(tmp_path):
    """decode="device" (workers pass bytes, torchvision decodes where the model runs) against PIL in the workers."""
    from pipeline.data.batches import EncodedBatch
    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.data.prefetch import device_batches

    for fmt, location in _jpeg_and_png_shards(tmp_path).items():
        manifest = load_manifest(str(location))
        by_workers = list(device_batches(eval_loader(str(location), manifest, "train", 4, 0), torch.device("cpu")))
        raw = list(eval_loader(str(location), manifest, "train", 4, 0, decode="device"))
        assert all(isinstance(b, EncodedBatch) for b in raw)
        on_device = list(device_batches(raw, torch.device("cpu")))
        assert len(by_workers) == len(on_device) == 3
        for a, b in zip(by_workers, on_device):
            assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
            assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)
            # both are libjpeg-turbo / libpng: the same pixels
            assert torch.equal(a.images, b.images), fmt


def test_device_decode_names_a_corrupt_image(tmp_path):
    import pytest

    from pipeline.data.batches import EncodedBatch
    from pipeline.data.prefetch import to_device
    from pipeline.support.errors import ShardError

    bad = EncodedBatch([torch.tensor([0xFF, 0xD8, 1, 2, 3], dtype=torch.uint8)], "jpg", torch.tensor([0]),
                       torch.tensor([0]), torch.tensor([False]), torch.tensor([17]))
    with pytest.raises(ShardError, match="cannot decode an image of samples \\[17\\]"):
        to_device(bad, torch.device("cpu"))


def test_auto_decode_is_the_device_for_jpeg_on_a_gpu_only():
    from pipeline.data.prefetch import resolve_decode

    assert resolve_decode("auto", "jpeg", torch.device("cuda")) == "device"
    assert resolve_decode("auto", "png", torch.device("cuda")) == "workers"
    assert resolve_decode("auto", "jpeg", torch.device("cpu")) == "workers"
    assert resolve_decode("device", "png", torch.device("cpu")) == "device"


def test_channels_last_inputs_hold_the_same_values():
    cfg = AugmentConfig(hflip=False, translate=0.0)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    plain = InputTransform((0.5,) * 3, (0.5,) * 3, cfg, "log", "torch", True)(images, train=False)
    nhwc = InputTransform((0.5,) * 3, (0.5,) * 3, cfg, "log", "torch", True, channels_last=True)(images, train=False)
    assert nhwc.images.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.spectra.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain.images, nhwc.images) and torch.equal(plain.spectra, nhwc.spectra)


def test_random_resized_crop_draws_the_boxes_timm_draws():
    """Each window's area fraction and aspect ratio, read back from its affine matrix, against timm's
    RandomResizedCropAndInterpolation.get_params on an image of the same size."""
    from PIL import Image
    from scipy.stats import ks_2samp
    from timm.data.transforms import RandomResizedCropAndInterpolation

    n, side, cfg = 4000, 224, AugmentConfig(hflip=True, scale_min=0.08)
    theta = affine_theta(torch.Size([n, 3, side, side]), cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]  # fractions of the image's width and height
    assert (theta[:, :, 2].abs() <= 1 - torch.stack([width, height], 1) + 1e-6).all()  # inside the image
    assert (theta[:, 0, 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.03)  # mirrored half the time
    random.seed(0)
    image = Image.new("RGB", (side, side))
    boxes = [RandomResizedCropAndInterpolation.get_params(image, (cfg.scale_min, 1.0), cfg.ratio) for _ in range(n)]
    timm_area = [h * w / side ** 2 for _, _, h, w in boxes]
    timm_log_aspect = [math.log(w / h) for _, _, h, w in boxes]
    # two samples of 4000 from one law: the KS distance exceeds 0.044 with probability 0.001
    assert ks_2samp((width * height).numpy(), timm_area).statistic < 0.044
    assert ks_2samp((width / height).log().numpy(), timm_log_aspect).statistic < 0.044


def test_crops_read_only_the_image():
    x = torch.full((64, 3, 16, 16), 200.0)
    out = augment(x, AugmentConfig(hflip=True, scale_min=0.5), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x)  # no zeros from beyond the edge blended in


def test_augmentation_draws_on_the_device_without_copies(monkeypatch):
    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (copies.append(a), to(self, *a, **k))[1])
    cfg = AugmentConfig(hflip=True, translate=0.125, scale_min=0.08)
    augment(torch.rand(4, 3, 8, 8) * 255, cfg, InputTransform((0.5,) * 3, (0.5,) * 3, cfg, "log", "torch", False).generator)
    assert all(a == (torch.float32,) for a in copies), copies  # theta to the images' dtype, nothing moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_on_a_gpu_does_not_wait_for_it():
    cfg = AugmentConfig(hflip=True, translate=0.125, scale_min=0.08)
    transform = InputTransform((0.5,) * 3, (0.5,) * 3, cfg, "log", "torch", False, device="cuda")
    images = torch.rand(8, 3, 32, 32, device="cuda") * 255
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(images, cfg, transform.generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
