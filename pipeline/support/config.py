"""Job configuration: dataclasses with defaults, YAML files, and dotted command-line overrides.

``load_config("configs/x.yaml", ["optim.lr=3e-4", "train.epochs=5"])`` reads the file, applies the
overrides in order, converts values to the declared types and validates the result. An unknown
key, a value of the wrong type or an out-of-range choice raises ``ConfigError`` naming the key and
the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.support.errors import ConfigError


@dataclass
class AugmentConfig:
    hflip: bool = True
    translate: float = 0.0  # max shift as a fraction of the side (0.125 = CIFAR's pad-4 crop at 32 px)
    scale_min: float = 1.0  # random zoom-in down to this fraction of the side (random-resized crop)


@dataclass
class DataConfig:
    shards: str = ""  # folder or URL prefix holding manifest.json, written by `mcci shards build`
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    num_workers: int = 2
    shuffle_buffer: int = 2000
    # auto: JPEG shards decode on the GPU (nvJPEG, workers only read tars) when there is one, else in
    # the workers; workers: PIL in the loader's workers; device: torchvision on the training device
    decode: str = "auto"
    # unset: the SFRN's pretrained input (timm's resolve_model_data_config), filled in when the model is built
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None  # unset: as mean
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    sfrn: str = "mcci_convnet_small"  # any timm model name
    # none | hub (timm's hub loading, needs the network) | a weights file (.safetensors, .pth): loaded, then checked
    pretrained: str = "none"
    feature_dim: int = 100  # SFRN and AIN output size before the fusion layer
    ain_widths: tuple[int, ...] = (32, 64, 128)
    ain_dropouts: tuple[float, ...] = (0.2, 0.3, 0.4)


@dataclass
class SpectrumConfig:
    normalisation: str = "log"  # log: sign(c)*log1p(|c|); raw: the reference's unscaled coefficients
    backend: str = "torch"  # torch | cupy | scipy


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | adadelta | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    step_epochs: tuple[int, ...] = (30, 60, 90)  # step schedule: multiply by step_gamma at these epochs
    step_gamma: float = 0.1
    grad_clip: float = 5.0  # max global grad norm; 0 disables


@dataclass
class ReferenceConfig:
    kind: str = "feature"  # feature: mean AIN output; spectrum: AIN output of the mean spectrum
    source: str = "trusted"  # a shard split: trusted | train | test-clean
    count: int = 100  # images averaged; 1 = a single image


@dataclass
class TrainConfig:
    defense: str = "mcci"  # mcci | none (the undefended baseline: the SFRN alone)
    epochs: int = 10
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    out: str = "runs/default"
    log_every: int = 50  # steps
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in out/checkpoints
    cpu: bool = False  # force the CPU even when a GPU is present
    compile: str = "no"  # no | inductor (torch.compile of the SFRN+AIN model) | aot_eager | eager (debugging)
    channels_last: bool = False  # NHWC model and inputs: faster convolutions (AIN, CNN SFRNs) on tensor cores


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "spectrum.normalisation": ("log", "raw"),
    "spectrum.backend": ("torch", "cupy", "scipy"),
    "optim.name": ("adamw", "adam", "adadelta", "sgd"),
    "optim.schedule": ("cosine", "step", "constant"),
    "reference.kind": ("feature", "spectrum"),
    "reference.source": ("trusted", "train", "test-clean"),
    "train.defense": ("mcci", "none"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.compile": ("no", "inductor", "aot_eager", "eager"),
    "data.decode": ("auto", "workers", "device"),
}
POSITIVE = ("data.batch_size", "data.eval_batch_size", "train.epochs", "optim.lr", "reference.count",
            "model.feature_dim", "data.shuffle_buffer")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = args[0]
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off as false: `train.compile=no` means "no"
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give its keys, e.g. {key}.{dataclasses.fields(current)[0].name}=...")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _convert(value, hints[name], key))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    return _nest(key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def validate(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
    for key in POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(getattr(cfg, section), name)}")
    if cfg.model.pretrained in ("yes", "no"):  # a YAML true/false: the key was a bool before it named a source
        raise ConfigError("model.pretrained takes none, hub or a weights file path (true is now hub, false none)")
    if len(cfg.model.ain_widths) != len(cfg.model.ain_dropouts):
        raise ConfigError("model.ain_widths and model.ain_dropouts must have the same length")
    if not 0.0 < cfg.data.augment.scale_min <= 1.0:
        raise ConfigError(f"data.augment.scale_min must be in (0, 1], got {cfg.data.augment.scale_min}")
    if not 0.0 <= cfg.data.augment.translate < 0.5:
        raise ConfigError(f"data.augment.translate must be in [0, 0.5), got {cfg.data.augment.translate}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each override in order; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
        _apply(cfg, data)
    for text in overrides:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-YAML form (tuples as lists), as saved with checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg
