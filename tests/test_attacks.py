import numpy as np
import pytest
from PIL import Image

from shards.attacks import ATTACKS, build_attack
from shards.errors import ShardBuildError


def test_registry_has_badnets_and_blended():
    assert {"badnets", "blended", "sig", "lf", "ftrojan"} <= set(ATTACKS)


def test_badnets_reference_pattern_is_pixel_exact_at_32px():
    image = np.full((32, 32, 3), 77, np.uint8)
    out = build_attack("badnets", {}, 32, seed=0).apply(image, 5)
    expected = np.array([[255, 0, 255], [0, 0, 0], [255, 0, 255]], np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[29:, 29:, c], expected)
    out[29:, 29:] = 77
    np.testing.assert_array_equal(out, image)  # nothing else changed
    assert image[31, 31, 0] == 77  # the input is not modified in place


def test_badnets_large_image_patch_is_seeded_and_ten_percent():
    image = np.zeros((224, 224, 3), np.uint8)
    a = build_attack("badnets", {}, 224, seed=3).apply(image, 0)
    b = build_attack("badnets", {}, 224, seed=3).apply(image, 99)
    c = build_attack("badnets", {}, 224, seed=4).apply(image, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    changed = np.argwhere(a.any(axis=2))
    assert changed.min(0).tolist() == [224 - 22, 224 - 22] and changed.max(0).tolist() == [223, 223]


def test_badnets_user_pattern_and_position(tmp_path):
    pattern = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(pattern).save(tmp_path / "p.png")
    attack = build_attack("badnets", {"pattern_file": str(tmp_path / "p.png"), "patch_size": 4, "position": [2, 5]}, 32, 0)
    out = attack.apply(np.zeros((32, 32, 3), np.uint8), 0)
    np.testing.assert_array_equal(out[2:6, 5:9], pattern)
    assert len(attack.describe()["assets"]["pattern_file"]) == 64  # sha256 recorded


def test_badnets_position_out_of_image():
    with pytest.raises(ShardBuildError, match="does not fit"):
        build_attack("badnets", {"position": [30, 30]}, 32, 0)


def test_blended_formula():
    image = np.full((8, 8, 3), 100, np.uint8)
    attack = build_attack("blended", {"alpha": 0.2}, 8, seed=1)
    out = attack.apply(image, 0)
    expected = np.rint(0.8 * 100 + 0.2 * attack.pattern.astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_blended_alpha_range():
    with pytest.raises(ShardBuildError, match="alpha"):
        build_attack("blended", {"alpha": 1.5}, 8, 0)


def test_unknown_attack_and_parameter():
    with pytest.raises(ShardBuildError, match="unknown attack 'nope'"):
        build_attack("nope", {}, 32, 0)
    with pytest.raises(ShardBuildError, match="no parameter"):
        build_attack("badnets", {"colour": 1}, 32, 0)


def test_sig_is_clean_label_and_adds_the_sinusoid():
    attack = build_attack("sig", {}, 32, seed=0)
    assert attack.clean_label
    image = np.full((32, 32, 3), 128, np.uint8)
    out = attack.apply(image, 0).astype(np.float64)
    expected = 128 + np.rint(40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32))
    np.testing.assert_allclose(out[5, :, 1], expected, atol=1)  # rint of the sum vs of the term
    assert np.all(out == out[0:1])  # the same on every row: a horizontal signal


def test_clean_label_attack_changes_no_training_label(image_tree, tmp_path):
    import json

    from shards.build import BuildSpec, build_shards

    m = build_shards(BuildSpec(source=str(image_tree), out=str(tmp_path / "s"), attack="sig", poison_rate=0.2,
                               target=1, trusted_count=0), progress=False)
    assert m["attack"]["clean_label"] and m["splits"]["train"]["poisoned"] == 7
    import webdataset as wds
    urls = [str(tmp_path / "s" / s["path"]) for s in m["splits"]["train"]["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["label"] == meta["orig_label"]
        if meta["poisoned"]:
            assert meta["orig_label"] == 1  # only target-class images carry the signal


def test_low_frequency_trigger_has_no_energy_above_its_cutoff():
    import scipy.fft

    from shards.attacks.low_frequency import low_frequency_mask

    attack = build_attack("lf", {}, 32, seed=0)
    image = np.full((32, 32, 3), 128, np.uint8)
    delta = attack.apply(image, 0).astype(np.float64) - 128
    assert np.abs(delta).max() == pytest.approx(16, abs=0.5)
    spectrum = scipy.fft.dctn(delta, axes=(0, 1), norm="ortho")
    high = ~low_frequency_mask(32, attack.cutoff)
    # only the rounding to whole pixel values (|error| <= 0.5) leaks above the cut-off
    assert (spectrum[high] ** 2).sum() <= 0.25 * 32 * 32 * 3
    assert (spectrum[high] ** 2).sum() < 0.02 * (spectrum ** 2).sum()
    unrounded = scipy.fft.dctn(attack.pattern, axes=(0, 1), norm="ortho")
    assert np.abs(unrounded[high]).max() < 1e-9


def test_ftrojan_changes_exactly_the_chosen_coefficients():
    from shards.attacks.ftrojan import RGB_TO_YUV, block_dct

    attack = build_attack("ftrojan", {}, 64, seed=0)
    image = np.random.default_rng(0).integers(40, 216, (64, 64, 3)).astype(np.uint8)
    before = image.astype(np.float64) @ RGB_TO_YUV.T
    after = attack.apply(image, 0).astype(np.float64) @ RGB_TO_YUV.T
    for ch in (1, 2):
        diff = block_dct(after[:, :, ch], 32) - block_dct(before[:, :, ch], 32)
        chosen = np.zeros((64, 64), bool)
        for r, c in ((15, 15), (31, 31)):
            chosen[r::32, c::32] = True
        np.testing.assert_allclose(diff[chosen], 30, atol=1.5)  # 4 windows x 2 positions
        # elsewhere only the rounding to uint8: noise of RMS ~0.25 spread over the basis
        assert np.sqrt((diff[~chosen] ** 2).mean()) < 0.5 and np.abs(diff[~chosen]).max() < 4
    luma = block_dct(after[:, :, 0], 32) - block_dct(before[:, :, 0], 32)
    assert np.sqrt((luma ** 2).mean()) < 0.5


def test_ftrojan_window_must_divide_the_image():
    with pytest.raises(ShardBuildError, match="must divide"):
        build_attack("ftrojan", {}, 48, 0)
