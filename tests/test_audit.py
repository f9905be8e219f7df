"""`mcci audit`: per-sample scores, the flag rule, the summary against recorded poison, the outputs."""
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.components.models import build_transform, load_trained
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.jobs.audit import COLUMNS, score_samples, summarise


def test_score_is_the_label_log_probability_the_own_spectrum_adds(trained, tiny_shards):
    model, cfg, _ = load_trained(trained / "mcci", torch.device("cpu"))
    manifest = load_manifest(str(tiny_shards))
    transform = build_transform(cfg)
    rows = score_samples(model, str(tiny_shards), manifest, "train", transform, torch.device("cpu"), 16, 0)
    expected = []
    with torch.no_grad():
        for batch in eval_loader(str(tiny_shards), manifest, "train", 16, 0):
            inputs = transform(batch.images, train=False)
            own = F.log_softmax(model(inputs.images, inputs.spectra), 1)
            mind_control = F.log_softmax(model(inputs.images), 1)  # the model's own mind-control forward
            expected.append(own.gather(1, batch.labels[:, None])[:, 0] - mind_control.gather(1, batch.labels[:, None])[:, 0])
    torch.testing.assert_close(rows[:, COLUMNS.index("score")], torch.cat(expected).double(), rtol=1e-5, atol=1e-5)
    assert rows.shape[0] == manifest["splits"]["train"]["count"]


def test_summary_against_recorded_poison():
    # index, label, orig_label, poisoned, own_pred, mind_control_pred, score, loss, ain_loss (the last two unused)
    rows = torch.tensor([[0, 0, 1, 1, 0, 1, 5.0, 1.0, 1.0],   # poisoned, flagged
                         [1, 0, 2, 1, 0, 2, 4.0, 1.0, 1.0],   # poisoned, flagged
                         [2, 1, 1, 0, 1, 2, 3.0, 1.0, 1.0],   # clean, flagged (fitted only through the AIN)
                         [3, 2, 2, 0, 2, 2, 0.1, 1.0, 1.0],   # clean, not flagged
                         [4, 0, 1, 1, 1, 1, 2.0, 1.0, 1.0]],  # poisoned, missed (the model did not fit its label)
                        dtype=torch.float64)
    summary = summarise(rows)
    assert (summary["samples"], summary["flagged"]) == (5, 3)
    truth = summary["recorded_poisoned"]
    assert truth["count"] == 3 and truth["flagged"] == 2
    assert truth["precision"] == pytest.approx(2 / 3, abs=1e-4) and truth["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert truth["auroc"] == pytest.approx(5 / 6, abs=1e-4)  # 5 of the 6 poisoned-clean pairs ordered right
    assert truth["precision_at_count"] == pytest.approx(2 / 3, abs=1e-4)
    assert "recorded_poisoned" not in summarise(rows[rows[:, 3] == 0])  # nothing recorded: no truth figures


def test_cli_writes_every_training_sample_once_most_suspicious_first(trained, tiny_shards, tmp_path, capsys):
    main(["audit", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(tmp_path / "a"),
          "--num-workers", "0", "--device", "cpu"])
    assert "train samples flagged" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    manifest = load_manifest(str(tiny_shards))
    assert len(lines) == len({r["index"] for r in lines}) == manifest["splits"]["train"]["count"]
    assert sum(r["poisoned"] for r in lines) == manifest["splits"]["train"]["poisoned"]
    assert all(a["score"] >= b["score"] for a, b in zip(lines, lines[1:]))
    for r in lines:
        assert r["flagged"] == (r["own_pred"] == r["label"] and r["mind_control_pred"] != r["label"])
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert summary["flagged"] == sum(r["flagged"] for r in lines)
    # the summary against the recorded poison, counted here from the samples it summarises
    poisoned = [r for r in lines if r["poisoned"]]
    clean = [r for r in lines if not r["poisoned"]]
    caught = sum(r["flagged"] for r in poisoned)
    ordered = sum((p["score"] > c["score"]) + 0.5 * (p["score"] == c["score"]) for p in poisoned for c in clean)
    truth = summary["recorded_poisoned"]
    assert (truth["count"], truth["flagged"]) == (len(poisoned), caught)
    assert truth["recall"] == pytest.approx(caught / len(poisoned), abs=1e-4)
    assert truth["precision"] == pytest.approx(caught / max(summary["flagged"], 1), abs=1e-4)
    # scores are written to 5 decimals: a pair they tie that the full scores ordered moves the count by 1/2
    assert truth["auroc"] == pytest.approx(ordered / (len(poisoned) * len(clean)), abs=1e-3)
    assert abs(truth["auroc"] - 0.5) > 0.05  # far enough from chance that a reversed score would not pass
    assert (tmp_path / "a" / "scores.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("run, extra, message", [("baseline", [], "undefended model"),
                                                 ("mcci", ["--split", "validation"], "no split 'validation'")])
def test_cli_refuses_what_it_cannot_audit(trained, tiny_shards, tmp_path, capsys, run, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--checkpoint", str(trained / run), "--shards", str(tiny_shards), "--out", str(tmp_path / "a"),
              "--num-workers", "0", "--device", "cpu", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
