"""Image files as a user has them (issue 29): EXIF orientation applied as image viewers apply it, in shards and in
`mcci predict`; class folders named in either Unicode form one class; an image too small to classify refused."""
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from shards.build import BuildSpec, build_shards
from shards.errors import ShardBuildError
from shards.sources import open_image_file

from conftest import make_image_tree


def upright_pattern(width: int = 20, height: int = 40) -> np.ndarray:
    """An image no rotation or flip leaves unchanged: a bright top-left block in a gradient."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    pixels[:height // 4, :width // 3] = (255, 255, 255)
    return pixels.astype(np.uint8)


def save_sideways(upright: np.ndarray, path: Path) -> None:
    """Stored as a phone stores a portrait photo: turned a quarter anticlockwise, with EXIF orientation 6 (display
    turned a quarter clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_exif_orientation_is_applied_when_a_file_is_read(tmp_path):
    upright = upright_pattern()
    save_sideways(upright, tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as stored:
        assert stored.size == (40, 20)  # what the file holds
    np.testing.assert_array_equal(np.asarray(open_image_file(str(tmp_path / "photo.png"))), upright)


def test_shards_hold_the_upright_image(tmp_path):
    tree = make_image_tree(tmp_path / "data", classes=2, per_class=4, test_per_class=2)
    upright = upright_pattern(32, 32)
    save_sideways(upright, tree / "train" / "class_0" / "0000.png")
    build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "s"), trusted_count=0, poison_rate=0.25,
                           shard_size=100), progress=False)
    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(str(tmp_path / "s"))
    found = [image for batch in eval_loader(str(tmp_path / "s"), manifest, "train", 16, 0)
             for image, index, poisoned in zip(batch.images, batch.indices, batch.poisoned)
             if int(index) == 0 and not poisoned]
    assert len(found) == 1 and np.array_equal(found[0].permute(1, 2, 0).numpy(), upright)


def test_predict_reads_a_photo_upright(trained, tmp_path):
    from pipeline.jobs.predict import predict

    upright = upright_pattern(32, 32)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    save_sideways(upright, tmp_path / "sideways.png")
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned_no_exif.png")
    a, b, c = predict(trained / "mcci", [str(tmp_path / n) for n in ("upright.png", "sideways.png",
                                                                     "turned_no_exif.png")], top_k=3, device="cpu")
    assert a["predictions"] == b["predictions"] != c["predictions"]


def test_class_folders_in_two_unicode_forms_are_one_class(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    tree = make_image_tree(tmp_path / "data", classes=2, per_class=4, test_per_class=2)
    (tree / "train" / "class_1").rename(tree / "train" / nfc)  # written on Linux
    (tree / "test" / "class_1").rename(tree / "test" / nfd)  # copied from a Mac
    manifest = build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "s"), trusted_count=0, poison_rate=0.25),
                            progress=False)
    assert manifest["class_names"] == sorted(["class_0", nfc]) and manifest["num_classes"] == 2
    assert manifest["splits"]["test-clean"]["count"] == 4
    (tree / "train" / "class_0").rename(tree / "train" / nfd)  # both forms in one split: two folders, one name
    with pytest.raises(ShardBuildError, match="are the same name 'café' in two Unicode forms"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "s2"), trusted_count=0), progress=False)


@pytest.mark.parametrize("size, refused", [((1, 1), True), ((3, 40), True), ((4, 4), False)])
def test_predict_refuses_an_image_too_small_to_classify(trained, tmp_path, capsys, size, refused):
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "tiny.png")
    argv = ["predict", "--checkpoint", str(trained / "mcci"), str(tmp_path / "tiny.png"), "--device", "cpu"]
    if not refused:  # 4 px for a 32 px model: enlarged 8x, the most predict does
        main(argv)
        assert "tiny.png\t" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert f"tiny.png is {size[0]}x{size[1]} px; the model sees 32 px, and an image under 4 px per side" in err[0]
