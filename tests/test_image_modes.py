"""Every Pillow mode a source image can have becomes the right 8-bit RGB, in shards and in `mcci predict`
(both open files through shards.sources.open_image_file)."""
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.errors import ShardBuildError
from shards.sources import open_image_file, to_rgb


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette entry 0 is transparent: shown over white
    return image


# (mode, image of 2x1 pixels, file format keeping the mode, expected RGB of the two pixels)
CASES = [
    ("1", Image.frombytes("1", (2, 1), bytes([0b01000000])), "PNG", [(0, 0, 0), (255, 255, 255)]),
    ("L", Image.fromarray(np.array([[0, 200]], np.uint8)), "PNG", [(0, 0, 0), (200, 200, 200)]),
    ("LA", Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), mode="LA"), "PNG",
     [(100, 100, 100), (255, 255, 255)]),
    ("P", _palette_with_transparency(), "PNG", [(255, 255, 255), (200, 100, 50)]),
    ("RGBA", Image.fromarray(np.array([[[0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8), mode="RGBA"), "PNG",
     [(0, 0, 255), (127, 127, 127)]),
    ("CMYK", Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 0]]], np.uint8), mode="CMYK"), "TIFF",
     [(0, 255, 255), (255, 255, 255)]),
    ("I;16", Image.fromarray(np.array([[0, 32896]], np.uint16)), "PNG", [(0, 0, 0), (128, 128, 128)]),
    ("I", Image.fromarray(np.array([[65535, 257 * 64]], np.int32), mode="I"), "TIFF", [(255, 255, 255), (64, 64, 64)]),
    ("F", Image.fromarray(np.array([[0.5, 1.0]], np.float32), mode="F"), "TIFF", [(128, 128, 128), (255, 255, 255)]),
]


@pytest.mark.parametrize("mode, image, fmt, expected", CASES, ids=[c[0] for c in CASES])
def test_every_mode_becomes_the_right_rgb(tmp_path, mode, image, fmt, expected):
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    with Image.open(path) as reopened:
        assert reopened.mode.split(";")[0] == mode.split(";")[0]  # the file really holds this mode
    rgb = open_image_file(str(path))
    assert rgb.mode == "RGB"
    assert [tuple(p) for p in np.asarray(rgb)[0]] == expected


def test_sixteen_bit_greyscale_is_not_white_in_shards(tmp_path):
    from shards.build import BuildSpec, build_shards

    for split, count in (("train", 6), ("test", 2)):
        for c in range(2):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((16, 16), 257 * (40 + 100 * c), np.uint16)).save(folder / f"{i}.png")
    out = tmp_path / "shards"
    m = build_shards(BuildSpec(source=str(tmp_path / "data"), out=str(out), trusted_count=0, poison_rate=0.2),
                     progress=False)
    urls = [str(out / s["path"]) for s in m["splits"]["test-clean"]["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert (pixels == 40 + 100 * json.loads(sample["json"])["label"]).all()


def test_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 199)
    with pytest.raises(ShardBuildError, match=r"big.png is 20x10 pixels, above the limit of 199"):
        open_image_file(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    assert open_image_file(str(tmp_path / "big.png")).size == (20, 10)


def test_rgb_is_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(pixels))), pixels)
