"""The `mcci` command end to end on tiny shards: train (baseline and MCCI), eval, JSON, errors."""
import json
import subprocess
import sys

import pytest

from pipeline.cli import main

from conftest import TINY_TRAIN


def mcci(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def test_train_writes_model_checkpoint_and_log(trained):
    model_dir = trained / "mcci" / "model"
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.yaml", "model.json"}
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["reference"] == {"kind": "feature", "source": "trusted", "count": 4, "per_class": [2, 1, 1],
                                 "shards_manifest_seed": 0, "attack": "badnets"}
    assert meta["weights"] == "raw"  # no EMA: the raw weights, and nothing beside them
    assert meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert (trained / "mcci" / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    log = [json.loads(line) for line in (trained / "mcci" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # 42 samples // 8 = 5 steps
    state = json.loads(next((trained / "mcci" / "checkpoints").glob("step-*/trainer.json")).read_text())
    assert state["step"] == 5 and state["epoch"] == 1


def _two_faced_copy(run, to):
    """A copy of an MCCI model whose predictions are known without running it: a head that reads the AIN's half only,
    so that with its own spectrum (AIN features of ordinary size) every input goes to class 0, the target, and under
    mind control (a reference feature of 1e5 in every column) every input goes to class 2."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run / "model", to)
    weights = load_file(str(to / "model.safetensors"))
    sfrn_width = weights["head.weight"].shape[1] - weights["reference_feature"].numel()
    weights["head.weight"] = torch.zeros_like(weights["head.weight"])
    weights["head.weight"][2, sfrn_width:] = 1e-3
    weights["head.bias"] = torch.tensor([5.0, 0.0, 0.0])
    weights["reference_feature"] = torch.full_like(weights["reference_feature"], 1e5)
    save_file(weights, str(to / "model.safetensors"))
    return to


def test_eval_writes_metrics_json_with_der(trained, tiny_shards, tmp_path):
    main(["eval", "--checkpoint", str(trained / "baseline"), "--shards", str(tiny_shards), "--out",
          str(tmp_path / "b.json"), "--num-workers", "0", "--device", "cpu"])
    model = _two_faced_copy(trained / "mcci", tmp_path / "model")
    main(["eval", "--checkpoint", str(model), "--shards", str(tiny_shards), "--out", str(tmp_path / "m.json"),
          "--baseline-metrics", str(tmp_path / "b.json"), "--reference", "spectrum:test-clean:3", "--num-workers", "0",
          "--device", "cpu"])
    from pipeline.support.metrics import defense_effectiveness_rating

    baseline = json.loads((tmp_path / "b.json").read_text())["baseline"]
    assert set(baseline) == {"clean_acc", "asr", "ra", "clean_acc_by_class"}
    metrics = json.loads((tmp_path / "m.json").read_text())
    # 12 clean test images, 4 a class; 8 triggered ones whose true label is not the target (0), 4 of them of class 2.
    # Own spectrum, all to class 0: 4 of 12 right, every triggered one to the target. Mind control, all to class 2:
    # 4 of 12 right, none to the target, 4 of 8 to their true class.
    assert {mode: {k: m[k] for k in ("clean_acc", "asr", "ra")} for mode, m in metrics["mcci"].items()} == {
        "own": {"clean_acc": 4 / 12, "asr": 1.0, "ra": 0.0}, "mind_control": {"clean_acc": 4 / 12, "asr": 0.0, "ra": 0.5}}
    assert metrics["mcci"]["own"]["clean_acc_by_class"] == [1.0, 0.0, 0.0]  # all to class 0: only its images right
    assert metrics["mcci"]["mind_control"]["clean_acc_by_class"] == [0.0, 0.0, 1.0]
    for mode in [*metrics["mcci"].values(), *metrics["references"].values()]:
        assert set(mode) == {"clean_acc", "asr", "ra", "clean_acc_by_class", "der"}
        assert mode["der"] == pytest.approx(defense_effectiveness_rating(baseline, mode))
    assert set(metrics["references"]) == {"spectrum:test-clean:3"}
    assert metrics["reference"]["count"] == 4 and metrics["reference"]["source"] == "trusted"


def test_existing_run_is_not_overwritten(trained, tiny_shards):
    r = mcci("train", f"data.shards={tiny_shards}", f"train.out={trained / 'mcci'}", *TINY_TRAIN, check=False)
    assert r.returncode == 2 and "train.resume=true" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "optim.lrr=1"], "did you mean 'lr'"),
    (["train", "data.shards=/nonexistent"], "no manifest.json at /nonexistent"),
    (["eval", "--checkpoint", "/nonexistent", "--shards", "/nonexistent"], "is not a trained mcci model"),
    (["shards", "build", "--source", "/nonexistent", "--out", "/tmp/x"], "does not exist"),
    (["shards", "build", "--source", "embedded:digits", "--out", "/tmp/x", "--poison-rate", "2"], r"\(0, 1\)"),
])
def test_bad_input_gives_a_one_line_error(args, message, tmp_path):
    r = mcci(*args, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    import re
    assert re.search(message, lines[0]), lines[0]


def test_a_corrupt_or_mismatched_saved_model_is_a_clear_error(trained, tiny_shards, tmp_path):
    import shutil

    model = shutil.copytree(trained / "mcci" / "model", tmp_path / "model")
    config = (model / "config.yaml").read_text()
    (model / "config.yaml").write_text(config.replace("mcci_convnet_tiny", "mcci_convnet_small"))
    r = mcci("eval", "--checkpoint", str(model), "--shards", str(tiny_shards), "--device", "cpu", check=False)
    assert r.returncode == 2 and "weights do not match its config" in r.stderr
    (model / "config.yaml").write_text(config)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    r = mcci("eval", "--checkpoint", str(model), "--shards", str(tiny_shards), "--device", "cpu", check=False)
    assert r.returncode == 2 and "is not a valid safetensors file" in r.stderr


def test_shards_of_another_task_are_refused(trained, tmp_path):
    from conftest import make_image_tree

    make_image_tree(tmp_path / "d", classes=4, per_class=6)
    mcci("shards", "build", "--source", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--trusted-count", "2")
    for job in (["eval"], ["audit", "--out", str(tmp_path / "a")]):
        r = mcci(*job, "--checkpoint", str(trained / "mcci"), "--shards", str(tmp_path / "s"), "--device", "cpu",
                 check=False)
        assert r.returncode == 2 and "has 4 classes at 32 px; the model expects 3 at 32 px" in r.stderr


def test_shards_build_command(tmp_path):
    from conftest import make_image_tree

    make_image_tree(tmp_path / "d", classes=3, per_class=6)
    r = mcci("shards", "build", "--source", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--attack", "blended",
             "--param", "alpha=0.3", "--trusted-count", "2", "--target", "2")
    assert "train 16 (" in r.stdout
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["attack"]["params"]["alpha"] == 0.3 and manifest["target"] == 2


def test_corrupt_shard_is_a_clear_error(trained, tiny_shards, tmp_path):
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(tiny_shards, broken)
    shard = next((broken / "test-clean").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside the first member
    r = mcci("eval", "--checkpoint", str(trained / "mcci"), "--shards", str(broken), "--num-workers", "0",
             "--device", "cpu", check=False)
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "test-clean-000000.tar" in r.stderr and "sha256" in r.stderr


def test_shards_preview_writes_a_png(tiny_shards, tmp_path):
    from PIL import Image

    main(["shards", "preview", str(tiny_shards), "--out", str(tmp_path / "p.png"), "--count", "4"])
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 400
    assert not list(tmp_path.glob("*.tmp*"))


def test_lc_takes_its_clean_model_from_a_baseline_checkpoint(trained, tiny_shards, tmp_path):
    import json

    data = tiny_shards.parent / "data"
    main(["shards", "build", "--source", str(data), "--out", str(tmp_path / "lc"), "--attack", "lc", "--poison-rate",
          "0.1", "--param", f"surrogate_checkpoint={trained / 'baseline'}", "--param", "steps=2", "--trusted-count", "0"])
    manifest = json.loads((tmp_path / "lc" / "manifest.json").read_text())
    assert len(manifest["attack"]["assets"]["surrogate_checkpoint"]) == 64
    assert not (tmp_path / "lc" / "assets").exists()  # nothing trained here
    bad = mcci("shards", "build", "--source", str(data), "--out", str(tmp_path / "lc2"), "--attack", "lc",
               "--param", f"surrogate_checkpoint={trained / 'mcci'}", "--trusted-count", "0", check=False)
    assert bad.returncode == 2 and "train.defense=none" in bad.stderr and not (tmp_path / "lc2").exists()


def test_compile_device_decode_and_channels_last_compute_the_same_steps(tiny_shards, tmp_path):
    """train.compile, data.decode=device and train.channels_last change how a step runs, not what it
    computes. (Channels-last is compared without the AIN: dropout draws its mask in memory order, so
    NHWC activations get other, equally random, masks.)"""
    def losses(name: str, *extra: str) -> list[float]:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / name}", *TINY_TRAIN, *extra])
        return [json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    plain = losses("plain")
    assert len(plain) == 5
    assert losses("fast", "train.compile=aot_eager", "data.decode=device") == pytest.approx(plain, rel=1e-4)
    assert losses("nhwc", "train.channels_last=true", "train.defense=none") == pytest.approx(
        losses("nchw", "train.defense=none"), rel=1e-4)
    # the saved weights keep their plain names, so eval loads them, and they score as the plain run's
    for name in ("fast", "plain"):
        main(["eval", "--checkpoint", str(tmp_path / name), "--shards", str(tiny_shards), "--num-workers", "0",
              "--device", "cpu", "--out", str(tmp_path / f"{name}.json")])
    fast, plain_metrics = (json.loads((tmp_path / f"{n}.json").read_text())["mcci"] for n in ("fast", "plain"))
    assert fast == plain_metrics


def test_models_record_their_data_and_jobs_check_it(trained, tiny_shards, tmp_path):
    """The fingerprint of the training shards travels with the model: the audit refuses other data,
    eval names it, and shards of other classes are refused by both."""
    from conftest import make_image_tree
    from pipeline.data.manifest import fingerprint, load_manifest

    meta = json.loads((trained / "mcci" / "model" / "model.json").read_text())
    assert meta["data_fingerprint"] == fingerprint(load_manifest(str(tiny_shards)))
    make_image_tree(tmp_path / "d", classes=3, per_class=8)
    mcci("shards", "build", "--source", str(tmp_path / "d"), "--out", str(tmp_path / "other"), "--trusted-count", "2",
         "--attack", "blended")
    r = mcci("audit", "--checkpoint", str(trained / "mcci"), "--shards", str(tmp_path / "other"), "--out",
             str(tmp_path / "a"), "--device", "cpu", check=False)
    assert r.returncode == 2 and "is not the data the model was trained on" in r.stderr
    r = mcci("eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tmp_path / "other"), "--device", "cpu",
             "--num-workers", "0", "--out", str(tmp_path / "m.json"))
    assert "is another build" in r.stdout
    data = json.loads((tmp_path / "m.json").read_text())["data"]
    assert data["trained_on"] == meta["data_fingerprint"] != data["shards"]
    renamed = json.loads((tmp_path / "other" / "manifest.json").read_text())
    renamed["class_names"] = ["a", "b", "c"]
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(renamed))
    r = mcci("eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tmp_path / "other"), "--device", "cpu",
             check=False)
    assert r.returncode == 2 and "another data set" in r.stderr
    renamed["num_classes"] = 4
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(renamed))
    r = mcci("eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tmp_path / "other"), "--device", "cpu",
             check=False)
    assert r.returncode == 2 and "says num_classes 4 but names 3 classes" in r.stderr


def test_a_command_leaves_the_process_group_it_ran_in(trained, tiny_shards, tmp_path):
    """Under torchrun a rank that exits with its gloo group alive can abort at interpreter exit."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(tmp_path / "m.json"),
              "--num-workers", "0", "--device", "cpu"])
    finally:
        left = not dist.is_initialized()
        if not left:
            dist.destroy_process_group()
    assert left and (tmp_path / "m.json").exists()
