import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import TINY_TRAIN
from mcci_models import MCCI, AttackIndicationNetwork, ModelError, create_model, create_sfrn
from mcci_models.ain import size_ain
from mcci_models.flops import forward_flops
from pipeline.data.spectra import spectrum


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, size", [("mcci_convnet_tiny", 32), ("resnet18_cifar", 32),
                                        ("vit_tiny_patch16_224", 32), ("vit_tiny_patch16_224", 224)])
def test_forward_under_autocast_is_finite(name, size, dtype):
    torch.manual_seed(0)
    model = create_model("mcci", name, num_classes=10, img_size=size).eval()
    pixels = torch.randint(0, 256, (2, 3, size, size)).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = model(pixels / 127.5 - 1, spectrum(pixels))
    assert logits.shape == (2, 10) and torch.isfinite(logits.float()).all()


def test_baseline_is_the_sfrn_alone():
    model = create_model("none", "mcci_convnet_tiny", num_classes=4, img_size=32)
    assert not isinstance(model, MCCI)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_mind_control_uses_the_stored_reference():
    torch.manual_seed(0)
    model = create_model("mcci", "mcci_convnet_tiny", num_classes=3, img_size=32).eval()
    images, spectra = torch.randn(5, 3, 32, 32), torch.randn(5, 3, 32, 32)
    with pytest.raises(RuntimeError, match="no mind-control reference"):
        model(images)
    model.set_reference("feature", spectra)
    with torch.no_grad():
        expected_feature = model.ain(spectra).mean(0)
        torch.testing.assert_close(model.reference_feature, expected_feature)
        own_with_reference = model.fuse(model.sfrn(images), expected_feature.expand(5, -1))
        torch.testing.assert_close(model(images), own_with_reference)
    model.set_reference("spectrum", spectra)
    with torch.no_grad():
        torch.testing.assert_close(model.reference_feature, model.ain(spectra.mean(0, keepdim=True))[0])
    assert bool(model.has_reference)


def test_local_weights_file_loads_through_timm(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = create_sfrn("resnet18", 100, 32, str(tmp_path / "resnet18.safetensors"))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 100  # head replaced for the new output size


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch ran-from-a-pickle",)


def test_a_weights_file_that_needs_code_to_unpickle_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    torch.save({**state, "payload": _RunsCode()}, tmp_path / "weights.pth")
    with pytest.raises(ModelError, match="cannot be loaded into resnet18.*save the weights as .safetensors"):
        create_sfrn("resnet18", 10, 32, str(tmp_path / "weights.pth"))
    assert not (tmp_path / "ran-from-a-pickle").exists()


def test_bad_model_inputs():
    with pytest.raises(ModelError, match="unknown timm model 'resnet81'; similar names: .*'resnet18'"):
        create_sfrn("resnet81", 10, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_sfrn("resnet18", 10, 32, "/nonexistent.safetensors")
    with pytest.raises(ModelError, match="must end in one of"):
        create_sfrn("resnet18", 10, 32, __file__)
    with pytest.raises(ModelError, match="no pretrained weights"):
        create_sfrn("mcci_convnet_tiny", 10, 32, "hub")  # refused before any download


def test_preact_resnet18_is_backdoorbenchs_architecture():
    """BackdoorBench's PreAct-ResNet18 (CIFAR-10, 10 classes): 11,171,146 parameters, 102 state tensors;
    pre-activation blocks whose projection shortcut reads the activated input."""
    model = create_sfrn("preact_resnet18", 10, 32).eval()
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    assert len(model.state_dict()) == 102 and model.get_classifier() is model.fc
    block = model.layer2[0]
    x = torch.randn(2, 64, 16, 16)
    activated = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(activated)))) + block.shortcut(activated)
    torch.testing.assert_close(block(x), expected)
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_reference_ain_keeps_its_stem_and_saved_models_load():
    """stem_stride 0 is AlexNet's 11x11 stride-4 stem above 64 px and none up to it: models saved
    before the size rule (no ain_stem_stride in their config) rebuild the same tensors."""
    big, small = AttackIndicationNetwork(224), AttackIndicationNetwork(32)
    assert big.net[0].kernel_size == (11, 11) and big.net[0].stride == (4, 4) and big.net[0].padding == (2, 2)
    assert isinstance(small.net[0], torch.nn.Sequential)  # the first block, no stem
    assert {k: v.shape for k, v in AttackIndicationNetwork(224, stem_stride=4).state_dict().items()} == \
        {k: v.shape for k, v in big.state_dict().items()}


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_size_ain_picks_the_costliest_candidate_within_the_budget(size):
    reference = forward_flops(AttackIndicationNetwork(size), (1, 3, size, size))
    budget = reference / 7  # forces a smaller AIN
    widths, stride, flops = size_ain(budget, size, 3, 100, (32, 64, 128), (0.2, 0.3, 0.4))
    built = AttackIndicationNetwork(size, 3, 100, widths, (0.2, 0.3, 0.4), stride)
    assert flops == forward_flops(built, (1, 3, size, size)) <= budget
    assert built(torch.zeros(2, 3, size, size)).shape == (2, 100)
    # nothing cheaper-than-budget but costlier than the choice among the neighbours: twice the widths,
    # or half the stride, is over the budget (or not a candidate)
    wider = AttackIndicationNetwork(size, 3, 100, tuple(2 * w for w in widths), (0.2, 0.3, 0.4), stride)
    assert forward_flops(wider, (1, 3, size, size)) > budget
    assert size_ain(reference, size, 3, 100, (32, 64, 128), (0.2, 0.3, 0.4))[:2] == ((32, 64, 128),
                                                                                    4 if size > 64 else 1)
    with pytest.raises(ValueError, match="no AIN fits"):
        size_ain(1e3, size, 3, 100, (32, 64, 128), (0.2, 0.3, 0.4))
    if size <= 64:  # the reference has no stem here, and the sized AIN gets none either
        assert stride == 1
        strided = forward_flops(AttackIndicationNetwork(size, stem_stride=2), (1, 3, size, size))
        # exactly the cost of a stride-2 stem at full width: the rule still shrinks the widths instead
        assert size_ain(strided, size, 3, 100, (32, 64, 128), (0.2, 0.3, 0.4))[1] == 1


def test_ain_budget_sizes_the_trained_model_and_the_saved_config_describes_it(tiny_shards, tmp_path):
    from pipeline.cli import main
    from pipeline.components.models import load_trained
    from conftest import TINY_TRAIN

    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN,
          "model.sfrn=mcci_convnet_small", "model.ain_widths=[32,64,128]", "model.ain_budget=0.05"])
    model, cfg, _ = load_trained(tmp_path / "run", torch.device("cpu"))
    sfrn, ain = forward_flops(model.sfrn, (1, 3, 32, 32)), forward_flops(model.ain, (1, 3, 32, 32))
    assert ain <= 0.05 * sfrn
    assert cfg.model.ain_budget == 0 and cfg.model.ain_widths != (32, 64, 128)  # sized once, saved as built


def test_an_ain_budget_nothing_fits_is_a_config_error(tiny_shards, tmp_path):
    from pipeline.cli import main
    from conftest import TINY_TRAIN

    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN,
              "model.ain_budget=0.0001"])
    assert stop.value.code == 2


def test_a_model_sized_by_budget_starts_from_the_weights_its_sizes_would_give_it():
    from pipeline.components.models import build_model
    from pipeline.support.config import load_config

    common = ["model.sfrn=mcci_convnet_tiny", "model.ain_widths=[16,32,64]", "train.cpu=true"]
    torch.manual_seed(0)
    sized = build_model(load_config(None, [*common, "model.ain_budget=0.2"]), 10, 32)
    torch.manual_seed(0)
    given = build_model(load_config(None, [*common[:1], "model.ain_widths=[8,16,32]", "train.cpu=true"]), 10, 32)
    assert [m.out_channels for m in sized.ain.modules() if isinstance(m, torch.nn.Conv2d)][::2] == [8, 16, 32]
    assert all(torch.equal(a, b) for a, b in zip(sized.state_dict().values(), given.state_dict().values()))


def test_the_ains_matched_filter_reads_a_faint_image_wide_pattern_that_no_neighbourhood_shows():
    from mcci_models.ain import AttackIndicationNetwork

    torch.manual_seed(0)
    ain = AttackIndicationNetwork(32, out_dim=4, widths=(4, 4, 4), kind="conv+matched", matched_grid=8).eval()
    spectra = torch.randn(64, 3, 32, 32)
    pooled = torch.nn.functional.adaptive_avg_pool2d(spectra, 8).flatten(1)
    torch.testing.assert_close(ain(spectra), ain.net(spectra) + ain.matched(pooled))
    # a pattern a fifth of the noise's scale in every coefficient (no coefficient alone tells it): the matched read
    # separates every marked input from every clean one
    pattern = 0.2 * torch.sign(torch.randn(1, 3, 8, 8)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        ain.matched.weight.zero_()
        ain.matched.weight[0] = torch.nn.functional.adaptive_avg_pool2d(pattern, 8).flatten()
        ain.matched.bias.zero_()
    read = lambda s: ain.matched(torch.nn.functional.adaptive_avg_pool2d(s, 8).flatten(1))[:, 0]  # noqa: E731
    clean, marked = read(spectra), read(spectra + pattern)
    assert marked.min() > clean.max()


def test_a_model_whose_ain_is_the_matched_filter_alone_saves_and_loads(tiny_shards, tmp_path):
    from pipeline.cli import main
    from pipeline.components.models import load_trained

    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'g'}", *TINY_TRAIN, "model.ain=matched",
          "model.ain_matched_grid=4", "train.eval_every=0"])
    model, cfg, _ = load_trained(tmp_path / "g", torch.device("cpu"))
    assert (cfg.model.ain, cfg.model.ain_matched_grid) == ("matched", 4)
    assert model.ain.net is None and model.ain.matched.in_features == 3 * 4 * 4
