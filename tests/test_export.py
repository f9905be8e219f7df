"""`mcci export`: MCCI folded under mind control into a plain timm model, reloadable by timm alone."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mcci_models  # noqa: F401  (registers the small SFRNs with timm)
from pipeline.cli import main
from pipeline.components.checkpoint import save_model
from pipeline.components.models import build_model, build_transform, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.jobs.predict import predict
from pipeline.support.config import load_config


def _reload(folder):
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # a folder on disk; conftest sets HF_HUB_OFFLINE=1


@pytest.mark.parametrize("run", ["mcci", "baseline"])
def test_export_reloads_in_timm_with_the_models_logits(trained, tiny_shards, tmp_path, run):
    main(["export", "--checkpoint", str(trained / run), "--out", str(tmp_path / "export")])
    exported = _reload(tmp_path / "export")
    model, cfg, meta = load_trained(trained / run, torch.device("cpu"))
    batch = next(iter(eval_loader(str(tiny_shards), load_manifest(str(tiny_shards)), "test-poisoned", 64, 0)))
    images = build_transform(cfg)(batch.images, train=False).images
    with torch.no_grad():
        torch.testing.assert_close(exported(images), model(images), rtol=1e-4, atol=1e-4)  # MCCI: mind control
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"] == meta["class_names"] and config["mcci"]["defense"] == meta["defense"]
    data = timm.data.resolve_data_config(model=exported)
    assert tuple(data["mean"]) == pytest.approx(cfg.data.mean) and tuple(data["input_size"]) == (3, 32, 32)
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in model.parameters()) or run == "baseline"


def test_export_predicts_what_mcci_predict_predicts(trained, tmp_path):
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    main(["export", "--checkpoint", str(trained / "mcci"), "--out", str(tmp_path / "export")])
    exported = _reload(tmp_path / "export")
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=exported))
    with torch.no_grad():
        mine = [int(exported(transform(Image.open(tmp_path / f"{i}.png").convert("RGB"))[None]).argmax())
                for i in range(6)]
    theirs = predict(trained / "mcci", [str(tmp_path / f"{i}.png") for i in range(6)], device="cpu")
    assert mine == [r["predictions"][0]["class"] for r in theirs]


def test_a_vit_sfrn_folds_exactly(tmp_path):
    cfg = load_config(None, ["model.sfrn=vit_tiny_patch16_224", "model.pretrained=none", "model.feature_dim=16",
                             "model.ain_widths=[4,4,4]"])
    model = build_model(cfg, 3, 32, load_pretrained=False).eval()
    model.set_reference("feature", torch.rand(4, 3, 32, 32))
    meta = {"defense": "mcci", "class_names": ["a", "b", "c"], "num_classes": 3, "image_size": 32, "target": 0,
            "mode": "all-to-one", "attack": "badnets", "reference": {"kind": "feature"}}
    save_model(tmp_path / "model", model.state_dict(), cfg, meta)
    main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "export")])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_reload(tmp_path / "export")(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_refuses_an_existing_folder(trained, tmp_path, capsys):
    (tmp_path / "export").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(trained / "mcci"), "--out", str(tmp_path / "export")])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
