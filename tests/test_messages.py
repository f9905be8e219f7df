"""Messages that must point at the right fix, and inputs that must not be accepted and ignored (issue 29)."""
import json
import shutil

import pytest
import torch

from pipeline.cli import main

from conftest import TINY_TRAIN


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and "writing shards" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return exit_info.value.code, lines[0]


@pytest.mark.parametrize("reference, message", [
    ("foo:trusted:3", "--reference 'foo:trusted:3': unknown kind 'foo'; use feature or spectrum"),
    ("feature:test-poisoned:3", "source 'test-poisoned' is not a split of clean images (it holds triggered images"),
    ("feature:val:3", "source 'val' is not a split of clean images; use trusted, train, test-clean"),
])
def test_a_reference_that_cannot_be_made_is_refused_before_any_work(trained, tiny_shards, tmp_path, capsys,
                                                                    reference, message):
    code, line = run_main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--device",
                           "cpu", "--reference", reference, "--out", str(tmp_path / "m.json")], capsys)
    assert code == 2 and message in line, line
    assert not (tmp_path / "m.json").exists()


def test_an_empty_reference_split_names_the_fix_for_that_split(trained, tiny_shards, tmp_path, capsys):
    """The fix for a split without images depends on the split: only the trusted one is --trusted-count's."""
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["trusted"] = {"count": 0, "poisoned": 0, "cross": 0, "shards": []}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, line = run_main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(shards), "--device", "cpu",
                           "--reference", "feature:trusted:3"], capsys)
    assert code == 2 and f"{shards} has no trusted images; build the shards with --trusted-count N" in line, line
    code, line = run_main(["train", f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN], capsys)
    assert code == 2 and "reference.source='trusted' has no images" in line and "--trusted-count" in line
    manifest["splits"]["test-clean"] = {"count": 0, "poisoned": 0, "cross": 0, "shards": []}
    manifest["splits"]["trusted"] = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["trusted"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, line = run_main(["train", f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN,
                           "reference.source=test-clean", "train.eval_every=0"], capsys)
    assert code == 2 and "reference.source='test-clean' has no images" in line and "--trusted-count" not in line, line


def test_the_reference_records_the_images_it_used_not_the_count_asked(trained, tiny_shards, tmp_path):
    """reference.count=100 of a 6-image trusted split would have been labelled 100 (fixed on main with per_class)."""
    main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--device", "cpu",
          "--num-workers", "0", "--reference", "feature:trusted:100", "--out", str(tmp_path / "m.json")])
    meta = json.loads((trained / "mcci" / "model" / "model.json").read_text())["reference"]
    assert meta["count"] == sum(meta["per_class"]) == 4  # TINY_TRAIN's reference.count=4, of the 6 trusted images
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "feature:trusted:100" in metrics["references"]


def test_refit_head_blames_max_images_not_the_trusted_split(trained, tiny_shards, tmp_path, capsys):
    code, line = run_main(["refit-head", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out",
                           str(tmp_path / "r"), "--max-images", "1", "--device", "cpu"], capsys)
    assert code == 2 and "--max-images 1 is fewer than the model's 3 classes" in line and "trusted-count" not in line
    assert not (tmp_path / "r").exists()


def test_an_absent_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for device in ("cuda", "cuda:1"):
        code, line = run_main(["eval", "--checkpoint", "x", "--shards", "y", "--device", device], capsys)
        assert code == 2 and f"--device: '{device}': no CUDA GPU is visible here; use --device cpu" in line, line


@pytest.mark.parametrize("params, message", [
    (["patch_size=abc"], "badnets --param patch_size='abc' must be a whole number of pixels >= 1"),
    (["patch_size=5"], "badnets --param patch_size sizes a pattern_file; without one the patch is the reference 3x3"),
    (["patch_fraction=0.3"], "badnets --param patch_fraction is not used at 32 px"),
    (["patch_fraction=abc"], "attack 'badnets': --param patch_fraction='abc' must be a number (default 0.1)"),
    (["alpha=.nan"], None),  # blended below
])
def test_an_attack_parameter_is_used_or_refused_never_ignored(image_tree, tmp_path, capsys, params, message):
    attack = ["--attack", "blended"] if params == ["alpha=.nan"] else []
    message = message or "attack 'blended': --param alpha=nan must be a finite number (default 0.2)"
    code, line = run_main(["shards", "build", "--source", str(image_tree), "--out", str(tmp_path / "s"),
                           "--trusted-count", "2", *attack, *[a for p in params for a in ("--param", p)]], capsys)
    assert code == 2 and message in line, line
    assert not (tmp_path / "s").exists()


def test_an_empty_ain_is_not_trained_as_mcci(tiny_shards, tmp_path, capsys):
    code, line = run_main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN,
                           "model.ain_widths=[]", "model.ain_dropouts=[]"], capsys)
    assert code == 2 and "model.ain_widths=[] leaves MCCI without an AIN" in line
    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'base'}", *TINY_TRAIN, "model.ain_widths=[]",
          "model.ain_dropouts=[]", "train.defense=none"])  # the undefended model has no AIN to leave out
