import torch

from pipeline.data.transforms import InputTransform, augment
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


def test_translate_is_a_whole_pixel_shift_with_zero_fill():
    x = torch.arange(1, 1 + 64, dtype=torch.float32).view(1, 1, 8, 8).repeat(8, 1, 1, 1)
    out = augment(x, AugmentConfig(hflip=False, translate=0.25), torch.Generator().manual_seed(1))
    for i in range(8):
        values = out[i][out[i] > 0]
        assert set(values.tolist()) <= set(x[0].flatten().tolist())  # no interpolated values


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
