"""Checkpoints a user or a crash damaged (issue 29): each is checked before it is resumed from; a damaged newest
one falls back to the previous complete one, saying so, and the result is still the uninterrupted run's; when none
can be used the run stops with one line, never restarting from step 0 by itself."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main

from conftest import TINY_TRAIN

RUN = [*TINY_TRAIN, "train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=10", "train.ema_decay=0.5"]


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints at steps 2, 4, 5 (epoch end), 6, 8 and 10."""
    out = tmp_path_factory.mktemp("straight") / "run"
    main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *RUN])
    return out


def crashed_copy(straight: Path, tmp_path: Path) -> Path:
    """The run as a crash before the model was saved would leave it."""
    out = tmp_path / "run"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("model", "*.png"))
    return out


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "trainer_json_missing": (lambda c: (c / "trainer.json").unlink(), "trainer.json is missing"),
    "trainer_json_damaged": (lambda c: truncate(c / "trainer.json", 100), "trainer.json is damaged"),
    "trainer_json_of_another_step": (
        lambda c: (c / "trainer.json").write_text(json.dumps({**json.loads((c / "trainer.json").read_text()),
                                                               "step": 4})),
        "trainer.json does not record this checkpoint's step"),
    "weights_missing": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "weights_header_damaged": (lambda c: truncate(c / "model.safetensors", 6), "model.safetensors is damaged"),
    "weights_truncated": (lambda c: truncate(c / "model.safetensors", (c / "model.safetensors").stat().st_size - 64),
                          "model.safetensors is damaged"),
    "optimizer_missing": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "optimizer_truncated": (lambda c: truncate(c / "optimizer.bin", 200), "it does not load"),
    "rng_missing": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl missing"),
    "ema_missing": (lambda c: (c / "ema.safetensors").unlink(), "ema.safetensors is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tiny_shards, tmp_path, capsys, damage):
    out = crashed_copy(straight, tmp_path)
    harm, problem = DAMAGE[damage]
    harm(out / "checkpoints" / "step-00000010")
    main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *RUN, "train.resume=true"])
    said = capsys.readouterr().out
    assert f"warning: skipped the newer checkpoint(s) step-00000010: {problem}" in said, said
    assert "resuming from step-00000008" in said and "resumed from step 8 (epoch 1)" in said
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    for key in a:  # steps 9 and 10 ran again from step 8: the uninterrupted run's weights
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # each step once
    assert (out / "checkpoints" / "step-00000010" / "trainer.json").is_file()  # replaced by a whole one


def test_when_no_checkpoint_can_be_used_the_run_stops_in_one_line(straight, tiny_shards, tmp_path, capsys):
    out = crashed_copy(straight, tmp_path)
    for folder in (out / "checkpoints").iterdir():
        (folder / "trainer.json").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *RUN, "train.resume=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert ("cannot resume: no checkpoint in" in err[0] and "step-00000010: trainer.json is missing" in err[0]
            and "step-00000002: trainer.json is missing" in err[0] and "another train.out" in err[0])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing trained, nothing removed
    # without train.resume the folder is refused as a run's, rather than trained over
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *RUN])
    assert stop.value.code == 2 and "already holds a training run" in capsys.readouterr().err


def test_a_changed_config_is_refused_not_skipped_to_an_older_checkpoint(straight, tiny_shards, tmp_path, capsys):
    out = crashed_copy(straight, tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *RUN, "optim.lr=0.5", "train.resume=true"])
    assert stop.value.code == 2 and "cannot resume: the checkpoint's run differs in optim.lr" in capsys.readouterr().err
