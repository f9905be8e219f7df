"""The training objective and the MCCI variants: each term does what it claims on constructed examples."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_TRAIN
from mcci_models import create_model
from mcci_models.mcci import MCCIParts
from pipeline.components.losses import generalised_cross_entropy, hsic, lff_weights, training_loss, unlearning_loss
from pipeline.data.transforms import ModelInputs


def test_hsic_is_near_zero_for_independent_features_and_grows_with_dependence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    independent = hsic(x, torch.randn(128, 8, generator=g))
    related = hsic(x, x[:, :4] * 2 + 0.1 * torch.randn(128, 4, generator=g))
    assert independent < 0.2 * related
    assert hsic(x, x) > related > independent >= 0


def _tiny_mcci() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mcci", "mcci_convnet_tiny", 3, 32, feature_dim=6, ain_widths=(4, 4, 4))


def _inputs() -> tuple[ModelInputs, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return ModelInputs(torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)), \
        torch.tensor([0, 1, 2, 0, 1, 2])


def test_parts_add_up_to_the_fused_logits():
    model = _tiny_mcci().eval()
    inputs, _ = _inputs()
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    torch.testing.assert_close(parts.sfrn_logits + parts.ain_logits - model.head.bias, parts.logits)
    torch.testing.assert_close(parts.logits, model(inputs.images, inputs.spectra))


def test_independence_term_pushes_only_the_sfrn():
    model = _tiny_mcci().eval()  # no dropout: both forward passes are the same, so their CE gradients cancel
    inputs, labels = _inputs()
    base = training_loss(model, inputs, labels)
    term = training_loss(model, inputs, labels, variant="independence", weight=1.0) - base
    assert term.item() > 0
    term.backward()
    assert model.ain.net[0][0].weight.grad.abs().max() < 1e-6
    assert model.sfrn.features[0].weight.grad.abs().sum() > 0


def test_lff_weights_favour_samples_the_ain_cannot_explain():
    sfrn_ce = torch.tensor([1.0, 1.0])
    ain_ce = torch.tensor([0.05, 3.0])  # the AIN explains sample 0 (a shortcut), fails on sample 1
    weights = lff_weights(sfrn_ce, ain_ce)
    assert weights[0] < 0.1 < 0.7 < weights[1]
    logits = torch.tensor([[4.0, 0.0], [0.5, 0.0]], requires_grad=True)  # sample 0 fitted, sample 1 barely
    generalised_cross_entropy(logits, torch.tensor([0, 0])).sum().backward()
    ce_grad = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([0, 0]), reduction="sum"), logits)[0]
    # relative to cross-entropy, GCE weights the fitted sample up: the shortcut learner learns the easy cue
    assert (logits.grad[0, 0] / ce_grad[0, 0]) > (logits.grad[1, 0] / ce_grad[1, 0])


def test_lff_term_is_the_weighted_sfrn_loss_plus_the_ains_gce():
    model = _tiny_mcci().eval()
    inputs, labels = _inputs()
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    sfrn_ce = F.cross_entropy(parts.sfrn_logits, labels, reduction="none")
    ain_ce = F.cross_entropy(parts.ain_logits, labels, reduction="none")
    expected = (F.cross_entropy(parts.logits, labels) + 0.5 * ((lff_weights(sfrn_ce, ain_ce) * sfrn_ce).mean()
                                                              + generalised_cross_entropy(parts.ain_logits, labels).mean()))
    assert training_loss(model, inputs, labels, variant="lff", weight=0.5).item() == pytest.approx(expected.item())


def test_isolate_unlearns_flagged_samples_on_the_sfrn_alone_bounded_at_chance():
    model = _tiny_mcci().eval()
    inputs, labels = _inputs()
    flagged = torch.tensor([True, False, True, False, False, False])
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    fused = F.cross_entropy(parts.logits, labels, reduction="none")
    sfrn = F.cross_entropy(parts.sfrn_logits, labels, reduction="none").clamp(max=torch.log(torch.tensor(3.0)))
    expected = torch.where(flagged, -0.5 * sfrn, fused).mean()
    got = training_loss(model, inputs, labels, variant="isolate", weight=0.5, flagged=flagged)
    assert got.item() == pytest.approx(expected.item())
    # before the switch (no flagged set) the variant is plain MCCI
    assert training_loss(model, inputs, labels, variant="isolate").item() == pytest.approx(
        training_loss(model, inputs, labels).item())

    # the sign and the bound, on logits made by hand: 3 classes, label 0
    sfrn_logits = torch.tensor([[1.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    logits = torch.zeros(3, 3, requires_grad=True)
    hand = MCCIParts(logits, torch.zeros(3, 1), torch.zeros(3, 1), sfrn_logits, torch.zeros(3, 3))
    unlearning_loss(hand, torch.zeros(3, dtype=torch.long), torch.tensor([True, True, False])).backward()
    assert sfrn_logits.grad[0, 0] > 0  # ascent: a descent step lowers the SFRN's logit of the flagged label
    assert torch.equal(sfrn_logits.grad[1], torch.zeros(3))  # already below chance (CE > log 3): no push
    assert torch.equal(sfrn_logits.grad[2], torch.zeros(3)) and torch.equal(logits.grad[:2], torch.zeros(2, 3))
    assert logits.grad[2, 0] < 0  # a sample not flagged: the fused cross-entropy as usual

    # every sample flagged: the AIN gets no gradient, the SFRN does
    training_loss(model, inputs, labels, variant="isolate", flagged=torch.ones(6, dtype=torch.bool)).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.ain.parameters())
    assert model.sfrn.features[0].weight.grad.abs().sum() > 0


def test_label_smoothing_reaches_the_loss():
    model = nn.Linear(4, 3)
    inputs = ModelInputs(torch.randn(5, 4), None)
    labels = torch.tensor([0, 1, 2, 0, 1])
    plain = training_loss(model, inputs, labels)
    smooth = training_loss(model, inputs, labels, label_smoothing=0.2)
    expected = F.cross_entropy(model(inputs.images), labels, label_smoothing=0.2).item()
    assert smooth.item() == pytest.approx(expected) and smooth.item() != pytest.approx(plain.item())


@pytest.mark.parametrize("variant", ["independence", "lff"])
def test_a_variant_trains_end_to_end(variant, tiny_shards, tmp_path):
    import json

    from pipeline.cli import main

    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / variant}", *TINY_TRAIN,
          f"train.mcci_variant={variant}", "train.eval_every=0"])
    log = [json.loads(line) for line in (tmp_path / variant / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and (tmp_path / variant / "model" / "model.safetensors").is_file()
