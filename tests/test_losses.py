"""The training objectives (pipeline/components/variants): each does what it claims, on constructed examples with
figures worked out by hand, so a wrong implementation fails."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_TRAIN
from mcci_models import create_model
from mcci_models.mcci import MCCIParts
from pipeline.components.variants import VARIANTS, build_variant
from pipeline.components.variants.independence import hsic
from pipeline.components.variants.isolate import unlearning_loss
from pipeline.components.variants.lff import generalised_cross_entropy, lff_weights
from pipeline.components.variants.base import scale_sfrn_gradient
from pipeline.components.variants.agreement import agreement_shares
from pipeline.components.variants.residual import sfrn_shares
from pipeline.data.batches import Batch
from pipeline.data.transforms import ModelInputs
from pipeline.support.config import MCCI_VARIANTS, load_config


def variant(name: str, *overrides: str):
    return build_variant(load_config(None, [f"train.mcci_variant={name}", *overrides]))


def test_every_registered_variant_is_a_config_choice_and_the_reverse():
    assert sorted(VARIANTS) == sorted(MCCI_VARIANTS)


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


def _batch(indices, poisoned=None) -> Batch:
    n = len(indices)
    return Batch(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                 torch.zeros(n, dtype=torch.long),
                 torch.tensor(poisoned if poisoned is not None else [False] * n), torch.tensor(indices))


class HandMade(nn.Module):
    """A 'model' whose halves are given: features are one-hot, so the head's halves are the given logits."""

    def __init__(self, sfrn_logits, ain_logits, bias=None):
        super().__init__()
        self.sfrn_term = nn.Parameter(torch.tensor(sfrn_logits))
        self.ain_term = nn.Parameter(torch.tensor(ain_logits))
        self.bias = nn.Parameter(torch.zeros(self.sfrn_term.shape[1]) if bias is None else torch.tensor(bias))

    def forward(self, images, spectra=None, return_parts=False):
        sfrn, ain = self.sfrn_term * 1, self.ain_term * 1  # as the model's forward makes them: non-leaf terms
        parts = MCCIParts(sfrn + ain + self.bias, sfrn, ain, sfrn + self.bias, ain + self.bias, sfrn, ain)
        return parts if return_parts else parts.logits


_NO_IMAGES = ModelInputs(torch.zeros(1), torch.zeros(1))


def test_parts_add_up_to_the_fused_logits():
    model = _tiny_mcci().eval()
    inputs, _ = _inputs()
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    torch.testing.assert_close(parts.sfrn_logits + parts.ain_logits - model.head.bias, parts.logits)
    torch.testing.assert_close(parts.logits, model(inputs.images, inputs.spectra))


def test_plain_mcci_is_the_fused_cross_entropy_with_label_smoothing():
    # two classes, fused logits [ln 3, 0]: p = [3/4, 1/4]; smoothing 0.2 targets [0.9, 0.1]
    model = HandMade([[math.log(3), 0.0]], [[0.0, 0.0]])
    expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    got = variant("none", "optim.label_smoothing=0.2").loss(model, _NO_IMAGES, torch.tensor([0]))
    assert got.item() == pytest.approx(expected)


def test_independence_term_pushes_only_the_sfrn():
    model = _tiny_mcci().eval()  # no dropout: both forward passes are the same, so their CE gradients cancel
    inputs, labels = _inputs()
    base = variant("none").loss(model, inputs, labels)
    term = variant("independence").loss(model, inputs, labels) - base
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


def test_lff_adds_the_weighted_sfrn_loss_and_the_ains_gce_to_the_fused_loss():
    # every logit 0, two classes: each cross-entropy is ln 2, the LfF weight ln2 / (ln2 + ln2) = 1/2, and the
    # AIN's GCE (1 - 0.5 ** 0.7) / 0.7; the fused loss stays in (docs/VARIANTS.md: what was measured)
    model = HandMade([[0.0, 0.0]], [[0.0, 0.0]])
    gce = (1 - 0.5 ** 0.7) / 0.7
    expected = math.log(2) + 0.5 * (0.5 * math.log(2) + gce)
    got = variant("lff", "train.mcci_variant_weight=0.5").loss(model, _NO_IMAGES, torch.tensor([0]))
    assert got.item() == pytest.approx(expected)


def test_isolate_unlearns_flagged_samples_on_the_sfrn_alone_bounded_at_chance_and_not_through_the_bias():
    # label 0 of 3 classes, the head's bias favouring it: the ascent may not lower the bias (a prior shift)
    model = HandMade([[1.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0] * 3] * 3, bias=[0.5, 0.0, 0.0])
    labels = torch.zeros(3, dtype=torch.long)
    iso = variant("isolate", "train.isolate_epoch=1", "train.epochs=2", "train.mcci_variant_weight=0.5")
    iso.flagged = torch.tensor([10, 11])
    loss = iso.loss(model, _NO_IMAGES, labels, batch=_batch([10, 11, 12]))
    # flagged rows: -w * min(CE of the SFRN's half with the bias, ln 3); row 1's is above ln 3, so ln 3 it is
    sfrn_half = torch.tensor([[1.5, 0.0, 0.0], [-2.5, 0.0, 0.0]])
    ce = F.cross_entropy(sfrn_half, labels[:2], reduction="none")
    fused = F.cross_entropy(torch.tensor([[1.5, 0.0, 0.0]]), labels[:1])
    assert ce[1] > math.log(3)
    assert loss.item() == pytest.approx(((-0.5 * ce[0]) - 0.5 * math.log(3) + fused).item() / 3)
    loss.backward()
    assert model.sfrn_term.grad[0, 0] > 0  # ascent: a descent step lowers the flagged label's SFRN logit
    assert torch.equal(model.sfrn_term.grad[1], torch.zeros(3))  # already below chance: no push
    assert model.ain_term.grad[:2].abs().max() == 0  # flagged: nothing for the AIN
    # the bias moves only by the unflagged sample's fused loss, as if the flagged ones were not there
    alone = HandMade([[1.0, 0.0, 0.0]], [[0.0] * 3], bias=[0.5, 0.0, 0.0])
    (F.cross_entropy(alone(None), labels[:1]) / 3).backward()
    torch.testing.assert_close(model.bias.grad, alone.bias.grad)


def test_isolate_is_plain_mcci_before_its_switch():
    model = _tiny_mcci().eval()
    inputs, labels = _inputs()
    iso = variant("isolate", "train.isolate_epoch=1", "train.epochs=2")
    assert iso.loss(model, inputs, labels, batch=_batch(range(6))).item() == pytest.approx(
        variant("none").loss(model, inputs, labels).item())


def test_unlearning_a_whole_batch_trains_the_sfrn_and_not_the_ain():
    model = _tiny_mcci().eval()
    inputs, labels = _inputs()
    parts = model(inputs.images, inputs.spectra, return_parts=True)
    unlearning_loss(parts, labels, torch.ones(6, dtype=torch.bool)).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.ain.parameters())
    assert model.head.bias.grad is None or model.head.bias.grad.abs().max() == 0
    assert model.sfrn.features[0].weight.grad.abs().sum() > 0


def test_residual_share_is_what_the_sfrn_earns_without_the_samples_own_spectrum():
    # two classes, labels 0. Row 0: a clean sample, the SFRN half sure of its label, its AIN half typical.
    # Row 1: a poisoned sample, the SFRN half against its label, its AIN half far for it. Row 2: typical.
    sfrn = [[3.0, 0.0], [-2.0, 0.0], [0.0, 0.0]]
    ain = [[0.0, 0.0], [6.0, 0.0], [0.0, 0.0]]
    parts = HandMade(sfrn, ain)(None, return_parts=True)
    shares = sfrn_shares(parts, torch.zeros(3, dtype=torch.long))
    # the batch's median AIN half is [0, 0]: rows 0 and 2 lose nothing without their own (share 1); row 1's
    # label has p = sigmoid(4) with its own and sigmoid(-2) without: share = sigmoid(-2) / sigmoid(4)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert shares.tolist() == pytest.approx([1.0, sigmoid(-2) / sigmoid(4), 1.0])
    assert sfrn_shares(parts, torch.zeros(3, dtype=torch.long), exponent=2.0)[1].item() == pytest.approx(
        (sigmoid(-2) / sigmoid(4)) ** 2)


def test_residual_scales_only_the_sfrns_gradient_and_keeps_the_loss():
    model = HandMade([[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0])
    parts = model(None, return_parts=True)
    shares = torch.tensor([1.0, 0.25])
    scaled = scale_sfrn_gradient(parts, shares)
    torch.testing.assert_close(scaled, parts.logits)
    F.cross_entropy(scaled, labels, reduction="sum").backward()
    sfrn_grad, ain_grad, bias_grad = model.sfrn_term.grad.clone(), model.ain_term.grad.clone(), model.bias.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(None), labels, reduction="sum").backward()
    torch.testing.assert_close(sfrn_grad, model.sfrn_term.grad * shares[:, None])
    torch.testing.assert_close(ain_grad, model.ain_term.grad)
    torch.testing.assert_close(bias_grad, model.bias.grad)


def test_residual_gives_the_sfrn_almost_nothing_from_a_sample_only_its_spectrum_explains():
    # three clean samples the SFRN half predicts (label 0) with a typical AIN half, and a poisoned one: the SFRN
    # half says class 1 (its content), the AIN half pulls hard to the label
    model = HandMade([[2.0, 0.0]] * 3 + [[-4.0, 0.0]], [[0.0, 0.0]] * 3 + [[9.0, 0.0]])
    res = variant("residual")
    labels = torch.zeros(4, dtype=torch.long)
    loss = res.loss(model, _NO_IMAGES, labels, batch=_batch(range(4), [False] * 3 + [True]))
    assert loss.item() == pytest.approx(F.cross_entropy(model(None), labels).item())  # the value: the fused loss
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    share = sigmoid(-4) / sigmoid(5)  # without its spectrum (the batch median, 0) the label is sigmoid(-4) likely
    # unscaled, the two terms' gradients are equal (both are dL/dlogits): the SFRN's is scaled by the share
    torch.testing.assert_close(model.sfrn_term.grad[:3], model.ain_term.grad[:3])
    torch.testing.assert_close(model.sfrn_term.grad[3], share * model.ain_term.grad[3])
    assert share < 0.02 and model.ain_term.grad[3].abs().max() > 0
    assert res.log_values() == {"sfrn_share_clean": 1.0, "sfrn_share_poisoned": round(share, 4)}
    assert res.log_values() == {}  # the window was reset


def test_residual_on_a_real_model_is_the_fused_loss_in_value():
    model = _tiny_mcci().eval()
    inputs, labels = _inputs()
    assert variant("residual").loss(model, inputs, labels, batch=_batch(range(6))).item() == pytest.approx(
        variant("none").loss(model, inputs, labels).item())


def test_agreement_share_is_one_less_the_sfrns_top_probability_over_the_labels():
    # three classes, labels 0. Row 0: the SFRN half ranks the label first (share 1). Row 1: p = [1/6, 4/6, 1/6]
    # (share 1 - 3/6). Row 2: its content is class 2 by 5 logits (a poisoned sample). Row 3: unsure (uniform): 1.
    sfrn = [[2.0, 0.0, 0.0], [0.0, math.log(4), 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]
    parts = HandMade(sfrn, [[0.0] * 3] * 3 + [[9.0, 0.0, 0.0]])(None, return_parts=True)
    labels = torch.zeros(4, dtype=torch.long)
    poisoned = 1 - (math.exp(5) - 1) / (math.exp(5) + 2)
    assert agreement_shares(parts, labels).tolist() == pytest.approx([1.0, 0.5, poisoned, 1.0], rel=1e-5)
    assert agreement_shares(parts, labels, exponent=2.0).tolist() == pytest.approx([1.0, 0.25, poisoned ** 2, 1.0], rel=1e-5)


def test_agreement_gives_the_sfrn_nothing_to_learn_a_trigger_from_while_the_ain_learns_it():
    # three clean samples the SFRN half predicts; a poisoned one whose content (class 1) the SFRN half reads and
    # whose AIN half does not yet explain the label (where the residual variant's gate is still open)
    model = HandMade([[2.0, 0.0]] * 3 + [[-4.0, 0.0]], [[0.0, 0.0]] * 4)
    agree = variant("agreement")
    labels = torch.zeros(4, dtype=torch.long)
    loss = agree.loss(model, _NO_IMAGES, labels, batch=_batch(range(4), [False] * 3 + [True]))
    assert loss.item() == pytest.approx(F.cross_entropy(model(None), labels).item())
    loss.backward()
    torch.testing.assert_close(model.sfrn_term.grad[:3], model.ain_term.grad[:3])
    share = 2 / (1 + math.exp(4))  # p_sfrn = [sigmoid(-4), sigmoid(4)]: 1 - (p_top - p_label) = 2 sigmoid(-4)
    torch.testing.assert_close(model.sfrn_term.grad[3], share * model.ain_term.grad[3])
    assert share < 0.04 and model.ain_term.grad[3, 0] < -0.1  # the AIN is pushed towards the label in full
    assert agree.log_values() == {"sfrn_share_clean": 1.0, "sfrn_share_poisoned": round(share, 4)}
    residual = variant("residual")  # the same batch: the AIN explains nothing yet, so the residual gate is open
    residual.loss(model, _NO_IMAGES, labels, batch=_batch(range(4), [False] * 3 + [True]))
    assert residual.log_values()["sfrn_share_poisoned"] == 1.0


@pytest.mark.parametrize("name", ["independence", "lff", "residual", "agreement"])
def test_a_variant_trains_end_to_end(name, tiny_shards, tmp_path):
    import json

    from pipeline.cli import main

    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / name}", *TINY_TRAIN,
          f"train.mcci_variant={name}", "train.eval_every=0"])
    log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in log)
    assert (tmp_path / name / "model" / "model.safetensors").is_file()
    if name in ("residual", "agreement"):  # the shares reach the log: the shards record which samples are poisoned
        assert all(0 <= r["sfrn_share_clean"] <= 1 for r in log)
