import torch

from pipeline.config import AugmentConfig
from pipeline.device import InputTransform, augment


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
