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

    assert score(_predictor(images, lambda y: y, target_of)) == {"clean_acc": 1.0, "asr": 1.0, "ra": 0.0}
    assert score(_predictor(images, lambda y: y, lambda y: y)) == {"clean_acc": 1.0, "asr": 0.0, "ra": 1.0}
    for c in range(CLASSES):
        expected = {"clean_acc": clean_labels.count(c) / len(clean_labels),
                    "asr": sum(target_of(y) == c for y in attacked) / len(attacked),
                    "ra": attacked.count(c) / len(attacked)}
        assert score(_predictor(images, lambda y: c, lambda y: c)) == pytest.approx(expected), c


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
