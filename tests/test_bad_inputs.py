"""One clear line, before any work: every expected error of the `mcci` command ends in one line on
stderr naming the key or path and the fix, exit code 2, no traceback; --debug / MCCI_DEBUG=1 show
the traceback. In-process (main() with argv) so each case costs milliseconds; test_cli runs a few
of them as real processes."""
import re

import pytest

from pipeline.cli import main
from pipeline.support.errors import ConfigError


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "metrics.json").write_text('{"mcci": {}}')
    (tmp_path / "broken.json").write_text("{")
    return tmp_path


CASES = [
    # configuration: file, syntax, keys, values
    (["train"], r"data.shards is not set; add data.shards=FOLDER"),
    (["train", "--config", "{d}/missing.yaml"], r"config file .*missing.yaml does not exist"),
    (["train", "--config", "{d}"], r"is a folder; give a YAML file"),
    (["train", "--config", "{d}/bad.yaml"], r"cannot read .*bad.yaml as YAML: .*line 3"),
    (["train", "--config", "{d}/binary.yaml"], r"cannot read .*binary.yaml as YAML"),
    (["train", "--config", "{d}/list.yaml"], r"must hold a mapping of sections"),
    (["train", "optim.lr=[1,"], r"override 'optim.lr=\[1,': the value is not valid YAML"),
    (["train", "=3"], r"unknown config key ''"),
    (["train", "data.num_workers=-1"], r"data.num_workers must be >= 0, got -1"),
    (["train", "train.log_every=0"], r"train.log_every must be >= 1, got 0"),
    (["train", "data.batch_size=0"], r"data.batch_size must be >= 1, got 0"),
    (["train", "data.eval_batch_size=-5"], r"data.eval_batch_size must be >= 1"),
    (["train", "data.mean=[0.5,0.5]"], r"data.mean must have 3 values .*got 2"),
    (["train", "data.std=[0.5,0,0.5]"], r"data.std must be > 0 \(each value\), got \[0.5, 0.0, 0.5\]"),
    (["train", "data.std=[0.5,0.5,0.5,0.5]"], r"data.std must have 3 values"),
    (["train", "train.out={d}/afile"], r"train.out=.*afile is a file; name a folder"),
    (["train", "data.shards={d}/afile"], r"data.shards=.*afile is a file"),
    (["train", "optim.lr=.nan"], r"optim.lr must be a finite number, got nan"),
    (["train", "optim.lr=.inf"], r"optim.lr must be a finite number"),
    (["train", "optim.lr=1e400"], r"optim.lr must be a finite number"),
    (["train", "optim.momentum=1.5"], r"optim.momentum must be >= 0 and < 1"),
    (["train", "optim.weight_decay=-0.1"], r"optim.weight_decay must be >= 0"),
    (["train", "optim.step_gamma=0"], r"optim.step_gamma must be > 0 and <= 1"),
    (["train", "optim.step_epochs=[0,10]"], r"optim.step_epochs must be >= 1 \(each value\)"),
    (["train", "optim.grad_clip=-1"], r"optim.grad_clip must be >= 0"),
    (["train", "optim.warmup_epochs=-1"], r"optim.warmup_epochs must be >= 0"),
    (["train", "model.ain_dropouts=[0.2,0.3,1.0]"], r"model.ain_dropouts must be >= 0 and < 1"),
    (["train", "model.ain_widths=[0,8,8]"], r"model.ain_widths must be >= 1"),
    (["train", "model.feature_dim=0"], r"model.feature_dim must be >= 1"),
    (["train", "train.seed=-1"], r"train.seed must be >= 0"),
    (["train", "train.epochs=0"], r"train.epochs must be >= 1"),
    (["train", "train.checkpoint_every=-2"], r"train.checkpoint_every must be >= 0"),
    (["train", "train.keep_checkpoints=-1"], r"train.keep_checkpoints must be >= 0"),
    (["train", "reference.count=0"], r"reference.count must be >= 1"),
    (["train", "data.shuffle_buffer=0"], r"data.shuffle_buffer must be >= 1"),
    (["train", "data.augment.translate=0.5"], r"data.augment.translate must be >= 0 and < 0.5"),
    (["train", "data.augment.scale_min=0"], r"data.augment.scale_min must be > 0 and <= 1"),
    (["train", "data.mean={{a: 1}}"], r"data.mean must be a list"),
    (["train", "train.epochs=true"], r"train.epochs must be an integer"),
    (["train", "model.sfrn=[1]"], r"model.sfrn must be a string"),
    # arguments of every command
    (["eval", "--checkpoint", "x", "--shards", "y", "--batch-size", "0"], r"--batch-size: must be at least 1"),
    (["eval", "--checkpoint", "x", "--shards", "y", "--num-workers", "-1"], r"--num-workers: must be at least 0"),
    (["eval", "--checkpoint", "x", "--shards", "y", "--device", "gpu"], r"'gpu' is not a device"),
    (["eval", "--checkpoint", "x"], r"the following arguments are required: --shards"),
    (["audit", "--checkpoint", "x", "--shards", "y", "--out", "z", "--batch-size", "-3"], r"must be at least 1"),
    (["predict", "--checkpoint", "x", "--top-k", "abc", "i.png"], r"--top-k: 'abc' is not an integer"),
    (["predict", "--checkpoint", "x", "--top-k", "0", "i.png"], r"--top-k: must be at least 1"),
    (["predict", "--checkpoint", "x"], r"required: images"),
    (["shards", "preview", "{d}", "--count", "0"], r"--count: must be at least 1"),
    (["shards", "preview", "{d}", "--pairs", "-1"], r"--pairs: must be at least 1"),
    (["quickstart", "--epochs", "0"], r"--epochs: must be at least 1"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--param", "alpha"], r"--param 'alpha' must look like KEY=VALUE"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--param", "=1"], r"must look like KEY=VALUE"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--attack-config", "{d}/missing.yaml"],
     r"--attack-config .*missing.yaml: cannot read it as YAML \(.*No such file"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--attack-config", "{d}/bad.yaml"],
     r"--attack-config .*bad.yaml: cannot read it as YAML"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--attack-config", "{d}/list.yaml"],
     r"must hold a YAML mapping, got list"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--workers", "-1"], r"--workers must be >= 0"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--seed", "-1"], r"--seed must be >= 0"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--image-size", "4096"], r"--image-size must be in 8..1024"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--jpeg-quality", "0"], r"--jpeg-quality must be in 1..100"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--shard-size", "0"], r"--shard-size must be at least 1"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--max-train", "0"], r"--max-train must be at least 1"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--max-test", "0"], r"--max-test must be at least 1"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--trusted-count", "-1"], r"--trusted-count must be >= 0"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/o", "--poison-rate", "nan"], r"--poison-rate must be in \(0, 1\)"),
    (["shards", "build", "--source", "/nonexistent", "--out", "{d}/afile"], r"--out .*afile is a file"),
    (["shards", "build", "--source", "{d}", "--out", ""], r"--out is empty"),
    (["shards", "build", "--source", "{d}", "--out", "{d}/sub", "--overwrite"], r"is, holds or lies inside the source"),
    (["eval", "--checkpoint", "x", "--shards", "y", "--baseline-metrics", "{d}/broken.json"],
     r"--baseline-metrics .*broken.json: cannot read it as JSON"),
    (["eval", "--checkpoint", "x", "--shards", "y", "--baseline-metrics", "{d}/metrics.json"],
     r"--baseline-metrics .*metrics.json has no clean_acc and asr"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_every_expected_error_is_one_line_with_exit_2(files, capsys, argv, message):
    code, err = run_main([a.format(d=files) for a in argv], capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("mcci ") and ": error: " in line
    assert re.search(message, line), line


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="data.batch_size must be >= 1"):
        main(["--debug", "train", "data.batch_size=0"])
    with pytest.raises(ConfigError):
        main(["train", "data.batch_size=0", "--debug"])  # after the subcommand too
    monkeypatch.setenv("MCCI_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "data.batch_size=0"])
    monkeypatch.setenv("MCCI_DEBUG", "0")
    assert run_main(["train", "data.batch_size=0"], capsys)[0] == 2


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import pipeline.jobs.quickstart

    def refuse(out, epochs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))
    monkeypatch.setattr(pipeline.jobs.quickstart, "quickstart", refuse)
    code, err = run_main(["quickstart"], capsys)
    assert code == 2
    assert one_line(err) == (f"mcci quickstart: error: {tmp_path / 'locked'}: Permission denied; check the path, "
                             "its permissions and free space")


def test_train_help_lists_every_config_key_with_its_default_and_description(capsys):
    from pipeline.support.config import keys

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name, f, default in keys():
        assert f.metadata["help"], name
        entry = re.search(rf"^  {re.escape(name)} = (.*)\n      (.*)$", text, re.M)
        assert entry, name
        assert f.metadata["help"] in entry.group(2)
    assert "  data.batch_size = 128\n      training images per step, per process (>= 1)" in text
    assert "  data.decode = auto\n" in text and "(auto | workers | device)" in text
