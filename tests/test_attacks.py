import numpy as np
import pytest
from PIL import Image

from shards.attacks import ATTACKS, build_attack
from shards.errors import ShardBuildError


def test_registry_has_badnets_and_blended():
    assert {"badnets", "blended"} <= set(ATTACKS)


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
