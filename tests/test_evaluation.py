"""evaluate() against predictors whose metrics are known in advance, over many small batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.components.evaluation import evaluate
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.transforms import InputTransform
from pipeline.support.config import AugmentConfig

CLASSES, TARGET, BATCH = 3, 1, 2  # target 1, not 0: a target read back as 0 would show
TRANSFORM = InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(), "log", "torch", with_spectra=False)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["all-to-one", "all-to-all"])
def shards(request, tmp_path_factory) -> Path:
    """BadNets shards with 15 test images in shards of 4: 8 batches of 2 per test split."""
    from shards.build import BuildSpec, build_shards

    from conftest import make_image_tree

    root = tmp_path_factory.mktemp(request.param)
    make_image_tree(root / "data", classes=CLASSES, per_class=6, test_per_class=5)
    build_shards(BuildSpec(source=str(root / "data"), out=str(root / "shards"), poison_rate=0.2, target=TARGET,
                           mode=request.param, shard_size=4, trusted_count=0), progress=False)
    return root / "shards"


def _test_images(location: Path) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """(SFRN input, true label) of every test image, per split, as evaluate() will see them."""
    manifest = load_manifest(str(location))
    return {split: [(image, int(label)) for batch in eval_loader(str(location), manifest, split, 16, 0)
                    for image, label in zip(TRANSFORM(batch.images, train=False).images, batch.orig_labels)]
            for split in ("test-clean", "test-poisoned")}


class Lookup(nn.Module):
    """Predicts, for each test image it was shown, the class a rule gives it (image bytes -> class)."""

    def __init__(self, classes: dict[bytes, int]):
        super().__init__()
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.tensor([self.classes[image.numpy().tobytes()] for image in images]), CLASSES).float()


def _predictor(images: dict, clean_rule, triggered_rule) -> Lookup:
    return Lookup({**{image.numpy().tobytes(): clean_rule(y) for image, y in images["test-clean"]},
                   **{image.numpy().tobytes(): triggered_rule(y) for image, y in images["test-poisoned"]}})


def test_known_predictors_score_what_they_are(shards):
    manifest = load_manifest(str(shards))
    all_to_all = manifest["mode"] == "all-to-all"
    target_of = (lambda y: (y + 1) % CLASSES) if all_to_all else (lambda y: TARGET)
    images = _test_images(shards)
    clean_labels = [y for _, y in images["test-clean"]]
    attacked = [y for _, y in images["test-poisoned"] if y != target_of(y)]  # the inputs ASR and RA are over
    assert len(attacked) == (15 if all_to_all else 10)

    def score(model: nn.Module) -> dict[str, float]:
        return evaluate(model, str(shards), manifest, TRANSFORM, CPU, batch_size=BATCH, num_workers=0)

    every_class = [1.0] * CLASSES
    assert score(_predictor(images, lambda y: y, target_of)) == {"clean_acc": 1.0, "asr": 1.0, "ra": 0.0,
                                                                 "clean_acc_by_class": every_class}
    assert score(_predictor(images, lambda y: y, lambda y: y)) == {"clean_acc": 1.0, "asr": 0.0, "ra": 1.0,
                                                                   "clean_acc_by_class": every_class}
    for c in range(CLASSES):
        expected = {"clean_acc": clean_labels.count(c) / len(clean_labels),
                    "asr": sum(target_of(y) == c for y in attacked) / len(attacked),
                    "ra": attacked.count(c) / len(attacked)}
        figures = score(_predictor(images, lambda y: c, lambda y: c))
        assert figures.pop("clean_acc_by_class") == [float(k == c) for k in range(CLASSES)]  # only class c's right
        assert figures == pytest.approx(expected), c
    # class 2's clean images called class 0: class 2 at 0, the others whole, and the average CA over all images
    shifted = score(_predictor(images, lambda y: 0 if y == 2 else y, lambda y: y))
    assert shifted["clean_acc_by_class"] == [1.0, 1.0, 0.0]
    assert shifted["clean_acc"] == pytest.approx(1 - clean_labels.count(2) / len(clean_labels))


def test_evaluation_reads_counts_back_once_not_per_batch(shards, monkeypatch):
    """Counts stay on the device until the end: the host reads a tensor as often for 8 batches as for 1."""
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: (reads.append(_n), _f(self, *a, **k))[1])
    manifest = load_manifest(str(shards))
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, CLASSES))
    per_batch_size = {}
    for batch_size in (BATCH, 16):
        reads.clear()
        evaluate(model, str(shards), manifest, TRANSFORM, CPU, batch_size=batch_size, num_workers=0)
        per_batch_size[batch_size] = list(reads)
    assert per_batch_size[BATCH] == per_batch_size[16]


def test_several_models_in_one_pass_score_as_each_alone_reading_the_data_once(shards, monkeypatch):
    """A run's raw weights and its EMA are validated together: each batch read once, each model's figures its own."""
    import pipeline.components.evaluation as evaluation

    manifest = load_manifest(str(shards))
    images = _test_images(shards)
    honest = _predictor(images, lambda y: y, lambda y: y)
    constant = _predictor(images, lambda y: 0, lambda y: 0)
    alone = {name: evaluate(model, str(shards), manifest, TRANSFORM, CPU, batch_size=BATCH, num_workers=0)
             for name, model in (("raw", honest), ("ema", constant))}
    reads = []
    loader = evaluation.eval_loader
    monkeypatch.setattr(evaluation, "eval_loader", lambda *a, **k: (reads.append(a[2]), loader(*a, **k))[1])
    together = evaluation.evaluate_models({"raw": honest, "ema": constant}, str(shards), manifest, TRANSFORM, CPU,
                                          batch_size=BATCH, num_workers=0)
    assert together == alone and together["raw"] != together["ema"]
    assert reads == ["test-clean", "test-poisoned"]  # one read of each split for both models


@pytest.fixture(scope="module")
def ordered_shards(tmp_path_factory) -> Path:
    """Shards whose trusted split, as a folder tree's, is stored in class order: 4 per class of 3."""
    from shards.build import BuildSpec, build_shards

    from conftest import make_image_tree

    root = tmp_path_factory.mktemp("ordered")
    make_image_tree(root / "data", classes=CLASSES, per_class=10, test_per_class=3)
    build_shards(BuildSpec(source=str(root / "data"), out=str(root / "shards"), poison_rate=0.2, target=TARGET,
                           shard_size=4, trusted_count=12), progress=False)
    return root / "shards"


def test_the_reference_is_drawn_from_every_class_of_a_class_ordered_split(ordered_shards):
    from pipeline.components.evaluation import class_quotas, reference_spectra

    manifest = load_manifest(str(ordered_shards))
    stored = [int(y) for b in eval_loader(str(ordered_shards), manifest, "trusted", 64, 0) for y in b.labels]
    assert stored == sorted(stored) and stored[:3] == [0, 0, 0]  # the first three would be one class
    transform = InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(), "log", "torch", with_spectra=True)
    spectra, per_class = reference_spectra(str(ordered_shards), manifest, "trusted", 3, transform, CPU)
    assert per_class == [1, 1, 1] and spectra.shape[0] == 3
    # they are the first image of each class: the same spectra as those images' own
    firsts = {}
    for batch in eval_loader(str(ordered_shards), manifest, "trusted", 64, 0):
        for image, label in zip(batch.images, batch.labels.tolist()):
            firsts.setdefault(label, image)
    expected = transform(torch.stack([firsts[c] for c in range(CLASSES)]), train=False).spectra
    torch.testing.assert_close(spectra, expected, atol=2e-3, rtol=0)  # JPEG/PNG decoders agree to rounding
    assert class_quotas(7, 3) == [3, 2, 2] and class_quotas(2, 3) == [1, 1, 0]
    _, short = reference_spectra(str(ordered_shards), manifest, "trusted", 30, transform, CPU)
    # asked for more than there are: every class gives what it has, and the record says so
    assert short == [stored.count(c) for c in range(CLASSES)]


def test_mcci_evaluation_runs_the_sfrn_once_per_batch_for_both_modes(shards):
    from mcci_models import create_model

    manifest = load_manifest(str(shards))
    torch.manual_seed(0)
    model = create_model("mcci", "mcci_convnet_tiny", CLASSES, 32, feature_dim=4, ain_widths=(4, 4, 4)).eval()
    transform = InputTransform((0.5,) * 3, (0.5,) * 3, AugmentConfig(), "log", "torch", with_spectra=True)
    model.set_reference("feature", torch.randn(2, 3, 32, 32))
    calls = []
    model.sfrn.register_forward_hook(lambda *_: calls.append(1))
    parts = {}
    results = evaluate(model, str(shards), manifest, transform, CPU, batch_size=BATCH, num_workers=0, parts=parts)
    batches = sum(1 for split in ("test-clean", "test-poisoned")
                  for _ in eval_loader(str(shards), manifest, split, BATCH, 0))
    assert len(calls) == batches  # once for both modes and the parts' figures
    calls.clear()
    assert evaluate(model, str(shards), manifest, transform, CPU, batch_size=BATCH, num_workers=0) == results
    assert len(calls) == batches
    mind_control = results["mind_control"]
    # the triggered inputs mind control sends to neither the target nor their class
    assert parts["mind_control_other"] == pytest.approx(1 - mind_control["asr"] - mind_control["ra"], abs=1e-4)
