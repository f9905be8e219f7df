"""Property-based: for any value of any config key, any config file and any command-line argument,
mcci either accepts it or refuses it with one line and exit code 2: never a traceback, never exit 1.
Config values are checked in-process through load_config (no training is launched per example);
command lines through main() on paths that do not exist, so each example stops before any work.
Examples are few per property (CI budget); the parametrised tests in test_bad_inputs hold the
cases found so far."""
import contextlib
import io
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.support.config import Config, keys, load_config
from pipeline.support.errors import ConfigError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["no", "yes", "auto", "1e-3", "[1,", "{a: 1}", "~", ".nan", "-.inf", "0x10"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=2), max_leaves=6)
KEYS = [name for name, _, _ in keys()]


def _accepted_or_config_error(overrides: list[str]) -> None:
    try:
        cfg = load_config(None, overrides)
    except ConfigError:  # the CLI prints it as one line (test_bad_inputs)
        return
    assert isinstance(cfg, Config)
    for name, _, value in keys(cfg):  # what is accepted is finite
        for item in value if isinstance(value, tuple) else (value,):
            assert not (isinstance(item, float) and not math.isfinite(item)), (name, value)


# The edges, drawn often: boundaries, non-finite numbers and wrong shapes.
edges = st.sampled_from([0, -1, 1, 0.0, -0.0, 0.5, 1.0, math.nan, math.inf, -math.inf, [], [0.5, 0.5], [1, 2, 3, 4]])


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=15, deadline=None)
@given(value=st.one_of(edges, values, st.lists(edges, max_size=4)))
def test_any_value_of_any_key_is_accepted_or_refused_with_a_config_error(key, value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    _accepted_or_config_error([f"{key}={text}"])


@SETTINGS
@given(text=st.text(max_size=40))
def test_any_override_text_is_accepted_or_refused(text):
    _accepted_or_config_error([text])


@SETTINGS
@given(content=st.one_of(st.text(max_size=80), st.dictionaries(st.sampled_from(["data", "model", "optim", "train", "x"]),
                                                               st.dictionaries(st.text(max_size=8), values, max_size=3),
                                                               max_size=3).map(yaml.safe_dump)))
def test_any_config_file_is_accepted_or_refused(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    try:
        load_config(path)
    except ConfigError:
        pass


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


arg_text = st.one_of(st.text(min_size=1, max_size=10).filter(lambda t: "\x00" not in t),
                     st.integers(-10**12, 10**12).map(str), st.floats().map(str))
COMMANDS = {  # the options each command takes, after arguments naming paths that do not exist
    "shards build --source /nonexistent/src --out {d}/out": ["--poison-rate", "--target", "--seed", "--image-size",
                                                             "--jpeg-quality", "--shard-size", "--trusted-count",
                                                             "--max-train", "--max-test", "--workers", "--attack", "--mode",
                                                             "--format", "--param", "--test-source"],
    "eval --checkpoint /nonexistent/run --shards /nonexistent/shards": ["--batch-size", "--num-workers", "--device",
                                                                        "--reference", "--out"],
    "audit --checkpoint /nonexistent/run --shards /nonexistent/shards --out {d}/audit": ["--batch-size", "--split",
                                                                                         "--num-workers", "--device"],
    "predict --checkpoint /nonexistent/run /nonexistent/images": ["--top-k", "--batch-size", "--device", "--out"],
    "export --checkpoint /nonexistent/run": ["--out"],
    "shards preview /nonexistent/shards": ["--count", "--pairs", "--out"],
}


@SETTINGS
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_any_argument_value_gives_one_line_and_exit_2(tmp_path, command, data):
    options = data.draw(st.lists(st.sampled_from(COMMANDS[command]), min_size=1, max_size=3, unique=True))
    argv = command.format(d=tmp_path).split()
    for option in options:
        argv += [f"{option}={data.draw(arg_text)}"]  # --opt=value: a value starting with "-" stays a value
    code, err = _run(argv)
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcci ") and ": error: " in lines[0], (argv, err)
