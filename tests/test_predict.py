"""`mcci predict`: image files -> classes, under mind control for MCCI, with the shard writer's fitting."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.components.models import build_transform, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.jobs.predict import predict


def _test_images(tiny_shards, folder):
    """The clean test split of the tiny shards, as PNG files in class subfolders; returns their pixels."""
    batch = next(iter(eval_loader(str(tiny_shards), load_manifest(str(tiny_shards)), "test-clean", 64, 0)))
    for i, (image, label) in enumerate(zip(batch.images, batch.orig_labels)):
        (folder / f"class{int(label)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"class{int(label)}" / f"{i:03d}.png")
    return batch.images


def test_predictions_are_the_mind_control_predictions(trained, tiny_shards, tmp_path):
    images = _test_images(tiny_shards, tmp_path / "imgs")
    records = predict(trained / "mcci", [str(tmp_path / "imgs")], top_k=3, device="cpu")
    assert len(records) == len(images)
    model, cfg, meta = load_trained(trained / "mcci", torch.device("cpu"))
    with torch.no_grad():
        expected = model(build_transform(cfg)(images, train=False).images).softmax(1)  # no spectrum: mind control
    by_file = {r["path"].split("/imgs/")[1]: r for r in records}
    files = sorted(by_file)  # class folders then file names: the order predict reads them in
    assert [r["path"].split("/imgs/")[1] for r in records] == files
    for key in files:
        i = int(key.split("/")[1][:3])
        top = by_file[key]["predictions"]
        assert top[0]["class"] == int(expected[i].argmax()) and top[0]["name"] == meta["class_names"][top[0]["class"]]
        assert top[0]["probability"] == pytest.approx(float(expected[i].max()), abs=1e-4)
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)


def test_a_larger_non_square_image_is_fitted_like_the_shard_writer(trained, tmp_path):
    from shards.build import fit_image

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png")
    Image.fromarray(fit_image(big, 32)).save(tmp_path / "fitted.png")
    a, b = predict(trained / "baseline", [str(tmp_path / "big.png"), str(tmp_path / "fitted.png")], top_k=3,
                   device="cpu")
    assert a["predictions"] == b["predictions"]


def test_cli_writes_jsonl(trained, tiny_shards, tmp_path, capsys):
    _test_images(tiny_shards, tmp_path / "imgs")
    main(["predict", "--checkpoint", str(trained / "mcci"), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.jsonl"),
          "--device", "cpu"])
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(len(r["predictions"]) == 1 for r in lines)


@pytest.mark.parametrize("case, extra, message", [("broken", [], "cannot read image"),
                                                 ("missing", [], "does not exist"),
                                                 ("no_images", [], "no images"),
                                                 ("one_image", ["--top-k", "4"], "--top-k must be between 1 and")])
def test_cli_refuses_bad_input_naming_it(trained, tmp_path, capsys, case, extra, message):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "broken":
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    if case == "no_images":
        (folder / "notes.txt").write_text("not an image")
    if case == "one_image":  # the tiny model has 3 classes
        Image.new("RGB", (32, 32)).save(folder / "ok.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(trained / "mcci"), str(folder), "--device", "cpu", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and (case == "one_image" or str(folder) in err)
