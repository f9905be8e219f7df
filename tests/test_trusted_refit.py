"""The trusted-refit benchmark over a matrix folder: each model refitted once, its figures as trained taken from the
experiment, its figures refitted those of the refitted model's own predictions."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.trusted_refit import attack_row, markdown
from conftest import TINY_TRAIN
from pipeline.cli import main
from pipeline.components.models import build_transform, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest


def _backdoored_run(shards, out, defense: str, target: int):
    """A run trained until it predicts well, then its head made to send every input to ``target`` (CA 1/3, ASR 1):
    a refit on the clean trusted images changes its predictions, so the figures of the model as trained cannot
    pass for the refitted model's."""
    main(["train", f"data.shards={shards}", f"train.out={out}", *TINY_TRAIN, "train.epochs=3", "train.eval_every=0",
          f"train.defense={defense}"])
    weights = load_file(str(out / "model" / "model.safetensors"))
    weights["head.bias"] = torch.full_like(weights["head.bias"], -30.0)
    weights["head.bias"][target] = 30.0
    save_file(weights, str(out / "model" / "model.safetensors"))


def _counted_by_hand(run, shards) -> dict[str, float]:
    """CA / ASR / RA of the model in ``run`` as it predicts (its plain forward: MCCI's is mind control), counted
    here from its predictions on the test splits."""
    model, cfg, _ = load_trained(run, torch.device("cpu"))
    manifest = load_manifest(str(shards))
    transform = build_transform(cfg)
    predicted = {}
    with torch.no_grad():
        for split in ("test-clean", "test-poisoned"):
            rows = [(model(transform(b.images, train=False).images).argmax(1), b.orig_labels)
                    for b in eval_loader(str(shards), manifest, split, 5, 0)]
            predicted[split] = tuple(torch.cat(column) for column in zip(*rows))
    pred, true = predicted["test-clean"]
    triggered, orig = predicted["test-poisoned"]
    keep = orig != manifest["target"]
    return {"clean_acc": round((pred == true).double().mean().item(), 4),
            "asr": round((triggered[keep] == manifest["target"]).double().mean().item(), 4),
            "ra": round((triggered[keep] == orig[keep]).double().mean().item(), 4)}


def test_each_model_is_refitted_once_and_scored_as_it_predicts(tiny_shards, tmp_path):
    folder = tmp_path / "matrix" / "badnets"
    folder.mkdir(parents=True)
    (folder / "shards").symlink_to(tiny_shards)
    target = load_manifest(str(tiny_shards))["target"]
    for name, defense in (("baseline", "none"), ("mcci", "mcci")):
        _backdoored_run(tiny_shards, folder / name, defense, target)
    # the experiment's figures, as the benchmark reads them: made up and all different, so taking the wrong one
    # (MCCI's own spectrum for its mind control, say) shows
    made_up = {"baseline": {"clean_acc": 0.11, "asr": 0.92, "ra": 0.03},
               "mcci": {"own": {"clean_acc": 0.44, "asr": 0.55, "ra": 0.66},
                        "mind_control": {"clean_acc": 0.77, "asr": 0.88, "ra": 0.99}}}
    (folder / "metrics.json").write_text(json.dumps(made_up))

    row = attack_row(folder, [], 0.01, None, 0, "cpu")
    assert list(row["models"]) == ["undefended", "MCCI"]
    assert row["models"]["undefended"]["trained"] == made_up["baseline"]
    assert row["models"]["MCCI"]["trained"] == made_up["mcci"]["mind_control"]
    for name, run in (("undefended", "baseline"), ("MCCI", "mcci")):
        refitted = _counted_by_hand(folder / "refit" / f"{name}-wd0.01", tiny_shards)
        assert row["models"][name]["refitted"] == refitted
        as_trained = _counted_by_hand(folder / run, tiny_shards)
        assert as_trained == {"clean_acc": 0.3333, "asr": 1.0, "ra": 0.0} and refitted != as_trained
        assert row["models"][name]["trusted_samples"] == 6

    written = (folder / "refit" / "MCCI-wd0.01" / "model" / "model.safetensors").stat().st_mtime_ns
    assert attack_row(folder, [], 0.01, None, 0, "cpu") == row  # read back, not refitted again
    assert (folder / "refit" / "MCCI-wd0.01" / "model" / "model.safetensors").stat().st_mtime_ns == written
    assert markdown([row]).count("| badnets |") == 2
