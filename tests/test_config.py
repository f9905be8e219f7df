import pytest

from pipeline.support.config import load_config, parse_override
from pipeline.support.errors import ConfigError


def test_defaults_file_and_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\n  name: sgd\nmodel:\n  ain_widths: [8, 16]\n  ain_dropouts: [0.1, 0.1]\n")
    cfg = load_config(f, ["optim.lr=3e-4", "train.epochs=7", "data.augment.hflip=false"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.name == "sgd" and cfg.train.epochs == 7
    assert cfg.model.ain_widths == (8, 16) and cfg.data.augment.hflip is False
    assert cfg.data.batch_size == 128  # untouched default


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'lr'"),
    ("optimizer.lr=1", "unknown config key 'optimizer'"),
    ("train.epochs=ten", "must be an integer"),
    ("train.mixed_precision=fp8", "must be one of"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim=3", "is a section"),
    ("train.epochs", "must look like"),
    ("model.ain_widths=[8]", "same length"),
])
def test_bad_config_is_refused_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("a=null") == {"a": None}


def test_bare_no_means_the_string_no_for_text_keys():
    cfg = load_config(None, ["train.mixed_precision=no", "train.compile=no"])
    assert (cfg.train.mixed_precision, cfg.train.compile) == ("no", "no")
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.mixed_precision=yes"])


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_a_config_saved_by_an_earlier_version_loads_in_todays_keys(tmp_path):
    old = tmp_path / "config.yaml"  # as `mcci train` saved it before model.pretrained named its source
    old.write_text("model:\n  sfrn: mcci_convnet_tiny\n  pretrained: false\n  weights_file: null\n")
    assert load_config(old).model.pretrained == "none"
    old.write_text("model:\n  pretrained: true\n  weights_file: /w.safetensors\n")
    assert load_config(old).model.pretrained == "/w.safetensors"
