"""The trusted-refit benchmark over a matrix folder: each model refitted once, scored as `mcci eval` scores it."""
import json

import pytest

from benchmarks.trusted_refit import attack_row, markdown
from pipeline.jobs.evaluate import evaluate_checkpoint


def test_each_model_is_refitted_once_and_scored_as_eval_scores_it(trained, tiny_shards, tmp_path):
    folder = tmp_path / "matrix" / "badnets"
    folder.mkdir(parents=True)
    for name, target in (("baseline", trained / "baseline"), ("mcci", trained / "mcci"), ("shards", tiny_shards)):
        (folder / name).symlink_to(target)
    metrics = {**evaluate_checkpoint(trained / "baseline", str(tiny_shards), num_workers=0, device="cpu"),
               **evaluate_checkpoint(trained / "mcci", str(tiny_shards), num_workers=0, device="cpu")}
    (folder / "metrics.json").write_text(json.dumps(metrics))

    row = attack_row(folder, [], "cv", None, 0, "cpu")
    assert list(row["models"]) == ["undefended", "MCCI"]
    assert row["models"]["MCCI"]["trained"]["asr"] == pytest.approx(metrics["mcci"]["mind_control"]["asr"], abs=1e-4)
    refit_mcci = evaluate_checkpoint(folder / "refit" / "MCCI-cv", str(tiny_shards), num_workers=0, device="cpu")
    assert row["models"]["MCCI"]["refitted"] == {k: pytest.approx(refit_mcci["mcci"]["mind_control"][k], abs=1e-4)
                                                 for k in ("clean_acc", "asr", "ra")}
    assert row["models"]["undefended"]["trusted_samples"] == 6

    written = (folder / "refit" / "MCCI-cv" / "model" / "model.safetensors").stat().st_mtime_ns
    assert attack_row(folder, [], "cv", None, 0, "cpu") == row  # read back, not refitted again
    assert (folder / "refit" / "MCCI-cv" / "model" / "model.safetensors").stat().st_mtime_ns == written
    assert markdown([row]).count("| badnets |") == 2
