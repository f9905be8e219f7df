"""Pretrained weights: the load check (file and ViT), the EfficientNet-Lite0 importer on a random model
saved in efficientnet_pytorch naming, old saved configs, and input statistics from the SFRN's config.
Offline: every weights file is made here; no wheel, no hub."""
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from mcci_models import ModelError, create_model, create_sfrn
from mcci_models.pretrained import LITE0_ARCH, import_lite0, sha256_of
from mcci_models.saved import CONFIG, MODEL_META, WEIGHTS
from mcci_models.sfrn import check_loaded
from pipeline.cli import main
from pipeline.components.models import build_transform, fill_input_stats, load_trained, model_meta
from pipeline.jobs.quickstart import QUICKSTART_OVERRIDES
from pipeline.support.config import ConfigError, load_config, to_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _saved(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_the_check_catches_a_backbone_tensor_timm_skips_without_a_word(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state["layer1.0.conv1.w"] = state.pop("layer1.0.conv1.weight")  # renamed: absent under its real name
    path = _saved(tmp_path, "renamed.safetensors", state)
    # The premise: with another number of classes timm drops the head, loads with strict=False and says nothing.
    skipped = timm.create_model("resnet18", pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": path})
    assert not torch.equal(skipped.layer1[0].conv1.weight, state["layer1.0.conv1.w"])
    with pytest.raises(ModelError, match=r"^pretrained weights do not fill ResNet: missing from the weights: "
                                         r"layer1\.0\.conv1\.weight; in the weights but not in the model: "
                                         r"layer1\.0\.conv1\.w \(only the classifier head"):
        create_sfrn("resnet18", 10, 32, path)


def test_weights_of_a_larger_relative_are_refused(tmp_path):
    path = _saved(tmp_path, "resnet34.safetensors", timm.create_model("resnet34").state_dict())
    with pytest.raises(ModelError, match=r"in the weights but not in the model: layer1\.2\."):
        create_sfrn("resnet18", 10, 32, path)  # every resnet18 tensor is in the file, resnet34's extra blocks are not


def test_only_the_head_is_reinitialised_and_the_log_says_so(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    path = _saved(tmp_path, "resnet18.safetensors", state)
    lines = []
    model = create_sfrn("resnet18", 10, 32, path, log=lines.append)
    assert lines == [f"SFRN resnet18: {sum(1 for k in state if 'num_batches' not in k) - 2} tensors loaded from "
                     f"{path} and checked against it; classifier head (fc.weight, fc.bias) re-initialised for 10 outputs"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    lines.clear()
    create_sfrn("resnet18", 1000, 32, path, log=lines.append)  # the file's own head size: the head loads too
    assert "re-initialised" not in lines[0]


def test_check_refuses_tensors_that_differ_or_stayed_initial():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    state = model.state_dict()
    source = {**state, "blocks.0.norm1.weight": state["blocks.0.norm1.weight"] + 1,  # same shape, not loaded
              "pos_embed": torch.zeros(1, 197, 192)}  # another shape: timm would resample it, here it stayed
    with pytest.raises(ModelError, match=r"not loaded \(differ from the weights\): blocks\.0\.norm1\.weight; "
                                         r"left at their initial value: pos_embed"):
        check_loaded(model, source, initial=lambda: state)
    assert check_loaded(model, {**state, "pos_embed": source["pos_embed"]}, initial=lambda: {
        **state, "pos_embed": torch.zeros_like(state["pos_embed"])}) == []  # resampled: changed from its start


@pytest.mark.parametrize("size", [224, 32])
def test_a_vit_loads_from_a_local_safetensors_file_through_the_check(tmp_path, size):
    source = timm.create_model("vit_tiny_patch16_224")
    path = _saved(tmp_path, "vit.safetensors", source.state_dict())
    lines = []
    model = create_model("mcci", "vit_tiny_patch16_224", 3, size, pretrained=path, feature_dim=16, log=lines.append)
    torch.testing.assert_close(model.sfrn.blocks[11].mlp.fc2.weight, source.blocks[11].mlp.fc2.weight)
    assert model.sfrn.pos_embed.shape == (1, (size // 16) ** 2 + 1, 192)  # resampled at 32 px
    assert "classifier head (head.weight, head.bias) re-initialised for 16 outputs" in lines[0]


# efficientnet_pytorch's names for timm's tf_efficientnet_lite0 (the first block has no expansion conv)
TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
FIRST = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
INVERTED = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
            "conv_pwl": "_project_conv", "bn3": "_bn2"}


def efficientnet_pytorch_state(model):
    """``model``'s state dict under efficientnet_pytorch's names, in that library's order."""
    starts = [sum(len(s) for s in model.blocks[:i]) for i in range(len(model.blocks))]
    out = {}
    for key, tensor in model.state_dict().items():
        part = key.split(".")
        if part[0] == "blocks":
            table = FIRST if part[1] == "0" else INVERTED
            name = ["_blocks", str(starts[int(part[1])] + int(part[2])), table[part[3]], *part[4:]]
        else:
            name = [TOP[part[0]], *part[1:]]
        out[".".join(name)] = tensor.clone()
    return out


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    model = timm.create_model(LITE0_ARCH)
    with torch.no_grad():  # BatchNorm statistics away from their 0/1 start, so a swap shows
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return model


def test_the_importer_maps_efficientnet_pytorch_names_onto_timm(tmp_path, lite0):
    theirs = efficientnet_pytorch_state(lite0)
    assert len([k for k in theirs if "num_batches" not in k]) == 247 and "_blocks.15._project_conv.weight" in theirs
    torch.save(theirs, tmp_path / "lite0.pth")
    sidecar = import_lite0(tmp_path / "w" / "lite0.safetensors", tmp_path / "lite0.pth",
                           expected_sha256=sha256_of(tmp_path / "lite0.pth"))
    imported = load_file(str(tmp_path / "w" / "lite0.safetensors"))
    assert imported.keys() == lite0.state_dict().keys()
    assert all(torch.equal(imported[k], v) for k, v in lite0.state_dict().items())
    assert json.loads((tmp_path / "w" / "lite0.json").read_text()) == sidecar
    assert sidecar["licence"] == "Apache-2.0" and sidecar["tensors"] == 247
    assert sidecar["source_sha256"] == sha256_of(tmp_path / "lite0.pth")
    assert sidecar["sha256"] == sha256_of(tmp_path / "w" / "lite0.safetensors")
    create_sfrn(LITE0_ARCH, 10, 64, str(tmp_path / "w" / "lite0.safetensors"))  # passes the load check


def test_the_importer_refuses_a_file_that_does_not_pair_up(tmp_path, lite0):
    theirs = efficientnet_pytorch_state(lite0)
    keys = list(theirs)  # the stem BatchNorm's running_mean and running_var listed the other way round
    i = keys.index("_bn0.running_mean")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    swapped = {k: theirs[k] for k in keys}
    for name, state, error in [("swapped", swapped, r"_bn0.running_var .* does not pair with bn1.running_mean"),
                               ("short", {k: v for k, v in theirs.items() if k != "_fc.bias"}, "holds 246 tensors")]:
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(ModelError, match=error):
            import_lite0(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pth",
                         expected_sha256=sha256_of(tmp_path / f"{name}.pth"))


def test_weights_import_verifies_the_sha256(tmp_path, lite0, capsys):
    torch.save(efficientnet_pytorch_state(lite0), tmp_path / "lite0.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "import", "--file", str(tmp_path / "lite0.pth"), "--out", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2
    assert "not 579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_model_pretrained_names_its_source(tmp_path):
    assert load_config(None, ["model.pretrained=hub"]).model.pretrained == "hub"
    with pytest.raises(ConfigError, match="takes none, hub or a weights file path"):
        load_config(None, ["model.pretrained=true"])
    with pytest.raises(ConfigError, match="unknown config key 'model.weights_file'"):
        load_config(None, ["model.weights_file=/w.safetensors"])


@pytest.mark.parametrize("old, now", [({"pretrained": False, "weights_file": None}, "none"),
                                      ({"pretrained": True, "weights_file": None}, "hub"),
                                      ({"pretrained": True, "weights_file": "/w.safetensors"}, "/w.safetensors")])
def test_a_model_saved_with_the_old_keys_still_loads(tmp_path, old, now):
    cfg = load_config(None, ["model.sfrn=mcci_convnet_tiny", "model.ain_widths=[4,4,4]", "data.mean=[0.5,0.5,0.5]",
                             "data.std=[0.5,0.5,0.5]"])
    model = create_model("mcci", "mcci_convnet_tiny", 3, 32, ain_widths=(4, 4, 4))
    saved = to_dict(cfg)
    del saved["model"]["pretrained"]
    saved["model"].update(old)
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    (tmp_path / MODEL_META).write_text(json.dumps({"num_classes": 3, "image_size": 32}))
    save_file(model.state_dict(), str(tmp_path / WEIGHTS))
    loaded, cfg, _ = load_trained(tmp_path, torch.device("cpu"))  # never loads the old source again
    assert cfg.model.pretrained == now
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sfrn, mean", [("tf_efficientnet_lite0", (0.5, 0.5, 0.5)), ("resnet18", IMAGENET_MEAN),
                                        ("resnet18_cifar", (0.5, 0.5, 0.5))])
def test_unset_input_statistics_come_from_the_sfrns_pretrained_config(sfrn, mean):
    cfg = load_config(None, [f"model.sfrn={sfrn}"])
    assert cfg.data.mean is None
    transform = build_transform(cfg)
    assert cfg.data.mean == pytest.approx(mean)
    torch.testing.assert_close(transform.mean.flatten(), torch.tensor(mean) * 255)
    manifest = {"class_names": ["a"], "num_classes": 1, "image_size": 32, "target": 0, "attack": {"name": "badnets"}}
    recorded = model_meta(cfg, manifest)["sfrn_input"]
    assert recorded["interpolation"] == timm.create_model(sfrn).pretrained_cfg["interpolation"]
    assert recorded["crop_pct"] == timm.create_model(sfrn).pretrained_cfg["crop_pct"]
    user = load_config(None, [f"model.sfrn={sfrn}", "data.mean=[0.1,0.2,0.3]"])
    fill_input_stats(user)  # what the user set stays; what they left unset comes from the model
    assert user.data.mean == (0.1, 0.2, 0.3) and user.data.std == cfg.data.std


def test_the_quickstart_keeps_its_input_statistics():
    cfg = load_config(None, QUICKSTART_OVERRIDES)
    fill_input_stats(cfg)
    assert cfg.data.mean == cfg.data.std == (0.5, 0.5, 0.5)  # what its figures were measured with
