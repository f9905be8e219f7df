"""Files a user can edit or damage (issue 29): model folders, manifests and config files are checked before any
work, and each problem is one line naming the file and the fix (exit 2): never a traceback, never a silently
wrong result (a duplicate YAML key used to keep the last value without a word)."""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY_TRAIN, run_main


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _nan_weights(model: Path) -> None:
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1 and "reference" not in k)
    weights[name][0] = float("nan")
    save_file(weights, str(model / "model.safetensors"))


MODEL_DAMAGE = {
    "config_not_yaml": (lambda m: (m / "config.yaml").write_text("model: [unclosed\n"),
                        "config.yaml cannot be read as YAML"),
    "config_a_list": (lambda m: (m / "config.yaml").write_text("- 1\n"),
                      "config.yaml does not hold the model and train sections"),
    "config_value_out_of_range": (
        lambda m: (m / "config.yaml").write_text((m / "config.yaml").read_text().replace("lr: ", "lr: -", 1)),
        r"config.yaml: optim.lr must be"),
    "meta_not_json": (lambda m: (m / "model.json").write_text("{"), "model.json cannot be read as JSON"),
    "meta_class_count": (lambda m: _edit_json(m / "model.json", num_classes=4),
                         "model.json says num_classes 4 but names 3 classes"),
    "meta_image_size_text": (lambda m: _edit_json(m / "model.json", image_size="32"),
                             "model.json has image_size '32', not a number of pixels"),
    "meta_defense": (lambda m: _edit_json(m / "model.json", defense="none"),
                     "model.json says defense 'none', its config.yaml 'mcci'"),
    "meta_names_missing_weights": (lambda m: _edit_json(m / "model.json", other_weights={"ema": "ema.safetensors"}),
                                   "ema.safetensors is missing \\(model.json names it as the model's ema weights\\)"),
    "weights_nan": (_nan_weights, "model.safetensors holds non-finite values \\(nan or inf\\)"),
    "weights_missing": (lambda m: (m / "model.safetensors").unlink(), "lacks model.safetensors"),
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(trained, tiny_shards, tmp_path, capsys, damage):
    import re

    run = tmp_path / "run"
    shutil.copytree(trained / "mcci", run)
    harm, message = MODEL_DAMAGE[damage]
    harm(run / "model")
    jobs = [["eval", "--checkpoint", str(run), "--shards", str(tiny_shards), "--device", "cpu", "--num-workers", "0"],
            ["predict", "--checkpoint", str(run), str(tmp_path), "--device", "cpu"],
            ["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]]
    for argv in jobs[:1] if damage == "meta_names_missing_weights" else jobs:  # only eval reads every weight set
        code, line = run_main(argv, capsys)
        assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "export").exists()


def test_the_weights_file_given_for_the_model_names_its_folder(trained, tiny_shards, capsys):
    weights = trained / "mcci" / "model" / "model.safetensors"
    code, line = run_main(["eval", "--checkpoint", str(weights), "--shards", str(tiny_shards), "--device", "cpu"], capsys)
    assert code == 2 and f"{weights} is a file; give the out folder of `mcci train` or its model/ folder" in line


def test_a_run_without_its_model_names_the_model_folder_and_the_resume(trained, tiny_shards, tmp_path, capsys):
    run = shutil.copytree(trained / "mcci", tmp_path / "run")
    (run / "model" / "model.safetensors").unlink()
    code, line = run_main(["eval", "--checkpoint", str(run), "--shards", str(tiny_shards), "--device", "cpu"], capsys)
    assert code == 2 and f"({run / 'model'} lacks model.safetensors)" in line and "train.resume=true" in line


def _manifest_edit(key: str):
    def edit(manifest: dict) -> None:
        splits = manifest["splits"]
        if key == "path_up":
            splits["train"]["shards"][0]["path"] = "../elsewhere/train-000000.tar"
        elif key == "path_absolute":
            splits["train"]["shards"][0]["path"] = "/etc/train-000000.tar"
        elif key == "path_url":
            splits["train"]["shards"][0]["path"] = "http://example.com/train-000000.tar"
        elif key == "duplicate_shard":
            splits["test-clean"]["shards"].append(dict(splits["train"]["shards"][0]))
            splits["test-clean"]["count"] += splits["train"]["shards"][0]["count"]
        elif key == "negative_count":
            splits["train"]["shards"][0]["count"] = -1
        elif key == "image_size_text":
            manifest["image_size"] = "32"
        elif key == "image_size_huge":
            manifest["image_size"] = 100000
        elif key == "duplicate_class":
            manifest["class_names"][1] = manifest["class_names"][0]
        elif key == "target_outside":
            manifest["target"] = 7
        elif key == "format_unknown":
            manifest["image_format"] = "gif"
    return edit


MANIFEST_DAMAGE = {
    "path_up": "lists shard '../elsewhere/train-000000.tar' of 'train', outside the shard folder",
    "path_absolute": "lists shard '/etc/train-000000.tar' of 'train', outside the shard folder",
    "path_url": "outside the shard folder",
    "duplicate_shard": "lists shard 'train/train-000000.tar' twice \\(in 'train' and 'test-clean'\\)",
    "negative_count": "gives shard 'train/train-000000.tar' a count or size that is not a whole number >= 0",
    "image_size_text": "has image_size '32', not a whole number of pixels in 8..1024",
    "image_size_huge": "has image_size 100000",
    "duplicate_class": "names a class twice",
    "target_outside": "has target 7, not a class index in 0..2",
    "format_unknown": "has image_format 'gif', not png or jpeg",
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_an_edited_manifest_is_refused_before_any_work(trained, tiny_shards, tmp_path, capsys, damage):
    import re

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    _manifest_edit(damage)(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["train", f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN],
                 ["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(shards), "--device", "cpu"]):
        code, line = run_main(argv, capsys)
        assert code == 2 and re.search(MANIFEST_DAMAGE[damage], line) and "manifest was edited or damaged" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, line_numbers", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "'lr' is given twice, on line 2 and line 3"),
    ("optim:\n  lr: 0.1\ntrain:\n  epochs: 2\noptim:\n  momentum: 0.5\n", "'optim' is given twice, on line 1 and line 5"),
])
def test_a_key_or_section_given_twice_in_a_config_file_is_an_error_naming_the_lines(tmp_path, capsys, text,
                                                                                   line_numbers):
    (tmp_path / "dup.yaml").write_text(text)
    code, line = run_main(["train", "--config", str(tmp_path / "dup.yaml")], capsys)
    assert code == 2 and f"cannot read {tmp_path / 'dup.yaml'} as YAML: {line_numbers}" in line, line
    (tmp_path / "attack.yaml").write_text("alpha: 0.1\nalpha: 0.3\n")
    code, line = run_main(["shards", "build", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--attack",
                           "blended", "--attack-config", str(tmp_path / "attack.yaml")], capsys)
    assert code == 2 and "'alpha' is given twice, on line 1 and line 2" in line, line
    code, line = run_main(["train", "data.mean={a: 1, a: 2}"], capsys)
    assert code == 2 and "'a' is given twice" in line


def test_a_merge_key_may_repeat_what_it_merges(tmp_path):
    from pipeline.support.config import strict_yaml_load

    assert strict_yaml_load("base: &b {lr: 1}\noptim:\n  <<: *b\n  lr: 2\n") == {"base": {"lr": 1}, "optim": {"lr": 2}}
    assert yaml.safe_load("a: 1") == strict_yaml_load("a: 1")
