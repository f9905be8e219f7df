"""SIGINT and SIGTERM (issue 29): train, eval, audit, quickstart and shards build end with one line saying what was
kept, exit 128 + the signal, and nothing half-written. The signal is sent by the process to itself from inside the
job (no timing); a guard handler stands in for SIGTERM's default action, which would kill the test run."""
import os
import signal

import pytest

from pipeline.cli import main

from conftest import TINY_TRAIN


@pytest.fixture(autouse=True)
def sigterm_guard():
    """What happens to a SIGTERM that mcci did not handle: without this guard the default action kills pytest."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler: mcci did not handle it")
    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    assert signal.getsignal(signal.SIGTERM) is unhandled  # mcci put back the handler it found
    signal.signal(signal.SIGTERM, previous)


def signal_after(monkeypatch, module, name: str, signum: int, calls: int = 1) -> None:
    """Make ``module.name`` send ``signum`` to this process after its ``calls``-th call returns."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        wrapped.calls += 1
        if wrapped.calls == calls:
            os.kill(os.getpid(), signum)
        return result
    wrapped.calls = 0
    monkeypatch.setattr(module, name, wrapped)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and "writing shards" not in line]  # progress
    assert len(lines) == 1 and "Traceback" not in err, err
    return exit_info.value.code, lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_says_which_checkpoint_it_kept(tiny_shards, tmp_path, monkeypatch, capsys, signum):
    import pipeline.jobs.train as train

    signal_after(monkeypatch, train, "save_training_state", signum, calls=2)
    out = tmp_path / "run"
    code, line = run_main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *TINY_TRAIN, "train.epochs=2",
                           "train.checkpoint_every=2"], capsys)
    name = signal.Signals(signum).name
    assert code == 128 + signum
    assert line == (f"mcci train: error: interrupted by {name}; kept: checkpoint step-00000004 in {out / 'checkpoints'} "
                    "(4 of 10 steps; continue with train.resume=true)")
    assert (out / "checkpoints" / "step-00000004" / "trainer.json").is_file() and not (out / "model").exists()
    monkeypatch.undo()
    main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *TINY_TRAIN, "train.epochs=2",
          "train.checkpoint_every=2", "train.resume=true"])
    assert "resumed from step 4" in capsys.readouterr().out and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("job", ["eval", "audit"])
def test_eval_and_audit_say_nothing_was_kept_and_write_nothing(trained, tiny_shards, tmp_path, monkeypatch, capsys,
                                                               job):
    import pipeline.jobs.audit as audit
    import pipeline.jobs.evaluate as evaluate

    if job == "eval":
        signal_after(monkeypatch, evaluate, "evaluate", signal.SIGTERM)
        argv = ["eval", "--out", str(tmp_path / "m.json")]
    else:
        signal_after(monkeypatch, audit, "score_samples", signal.SIGTERM)
        argv = ["audit", "--out", str(tmp_path / "audit")]
    code, line = run_main([*argv, "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--device",
                           "cpu", "--num-workers", "0"], capsys)
    assert code == 143
    assert line == (f"mcci {job}: error: interrupted by SIGTERM; nothing was kept, and nothing is half-written: this "
                    "command writes its outputs aside and renames them when complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_build_says_it_removed_its_partial_folder(image_tree, tmp_path, monkeypatch, capsys):
    import shards.build as build

    signal_after(monkeypatch, build, "_write_shard", signal.SIGTERM)
    out = tmp_path / "shards"
    code, line = run_main(["shards", "build", "--source", str(image_tree), "--out", str(out), "--trusted-count", "2",
                           "--shard-size", "4"], capsys)
    assert code == 143 and line == (f"mcci shards: error: interrupted by SIGTERM; kept: nothing: the partial shard "
                                    f"folder was removed, and {out} is as it was before")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_quickstart_says_its_finished_stages_are_kept(tiny_shards, tmp_path, monkeypatch, capsys):
    """The quickstart's shards are built, the baseline trains and is stopped after its first checkpoint."""
    import pipeline.jobs.experiment as experiment
    import pipeline.jobs.quickstart as quickstart
    import pipeline.jobs.train as train
    from shards.build import BuildSpec

    monkeypatch.setattr(quickstart, "QUICKSTART_SHARDS", BuildSpec(source=str(tiny_shards.parent / "data"), out="",
                                                                   trusted_count=6, poison_rate=0.2))
    monkeypatch.setattr(quickstart, "QUICKSTART_OVERRIDES", [o for o in TINY_TRAIN if not o.startswith("train.epochs")])
    signal_after(monkeypatch, train, "save_training_state", signal.SIGTERM)
    out = tmp_path / "q"
    code, line = run_main(["quickstart", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 143 and line.startswith(f"mcci quickstart: error: interrupted by SIGTERM; kept: the finished stages "
                                           f"in {out} (the same command continues from them); checkpoint step-00000005 "
                                           f"in {out / 'baseline' / 'checkpoints'}"), line
    assert (out / "shards" / "manifest.json").is_file() and not (out / "metrics.json").exists()
    assert experiment.CONFIG_FILE in {p.name for p in out.iterdir()}
