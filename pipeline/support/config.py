"""Job configuration: dataclasses with defaults, YAML files, and dotted command-line overrides.

``load_config("configs/x.yaml", ["optim.lr=3e-4", "train.epochs=5"])`` reads the file, applies the
overrides in order, converts values to the declared types and validates the result. An unknown
key, a value of the wrong type or an out-of-range choice raises ``ConfigError`` naming the key and
the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcci_models.ain import AIN_KINDS
from mcci_models.factory import AIN_VIEWS
from mcci_models.saved import upgrade_config
from pipeline.support.errors import ConfigError


# train.mcci_variant's choices: the modules of pipeline/components/variants (a test keeps the two in step)
MCCI_VARIANTS = ("none", "independence", "lff", "isolate", "residual", "agreement")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, length: int | None = None,
            gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None) -> Any:
    """A config key: its default, the one-line description `mcci train --help` prints, and what
    ``validate`` allows (``choices``; a tuple's ``length``; bounds, applied to each item of a tuple)."""
    rules = {k: v for k, v in dict(choices=choices, length=length, gt=gt, ge=ge, lt=lt, le=le).items() if v is not None}
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class AugmentConfig:
    hflip: bool = setting(True, "random horizontal flip")
    translate: float = setting(0.0, "max shift as a fraction of the side (0.125 = CIFAR's pad-4 crop at 32 px)",
                               ge=0.0, lt=0.5)
    # timm's RandomResizedCrop: shards need room to crop (docs/ARCHITECTURE.md, "Shard size and crops")
    scale_min: float = setting(1.0, "random-resized crop: the window's area a fraction of the image's, uniform in "
                               "[scale_min, 1] (1: no crop)", gt=0.0, le=1.0)
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "random-resized crop: width/height log-uniform in this range",
                                         gt=0.0)
    # timm's Mixup, on the augmented pixels before the spectrum: the AIN sees the mixed image too
    mixup_alpha: float = setting(0.0, "mixup's Beta(alpha, alpha) (timm's Mixup; 0: off)", ge=0.0)
    cutmix_alpha: float = setting(0.0, "cutmix's Beta(alpha, alpha) (timm's Mixup; 0: off)", ge=0.0)
    mix_prob: float = setting(1.0, "share of batches mixed when mixup or cutmix is on", ge=0.0, le=1.0)
    mix_switch_prob: float = setting(0.5, "with both on: the share of mixed batches that use cutmix",
                                     ge=0.0, le=1.0)


@dataclass
class DataConfig:
    shards: str = setting("", "folder or URL prefix holding manifest.json, written by `mcci shards build`")
    batch_size: int = setting(128, "training images per step, per process", ge=1)
    eval_batch_size: int = setting(256, "images per evaluation batch", ge=1)
    num_workers: int = setting(2, "shard-reading processes per training process (0: in the main process)", ge=0)
    shuffle_buffer: int = setting(2000, "samples held for shuffling the stream", ge=1)
    in_memory: bool = setting(False, "decode the train split once and keep it on the device, each epoch a seeded "
                              "permutation of it (small data: CIFAR-10 is 154 MB); refused when it would take over "
                              "half the free memory")
    decode: str = setting("auto", "auto: JPEG on the GPU (nvJPEG) when there is one, else in the workers; "
                          "workers: PIL in the loader's workers; device: torchvision on the device",
                          choices=("auto", "workers", "device"))
    # remote shards (http(s)://, s3://, gs://; credentials from the environment): pipeline/data/storage.py
    verify: str = setting("hash", "hash: each shard's size and sha256 checked before its samples are used, its sample "
                          "count as it is parsed; size: all but the hash (eval, audit and refit-head always hash)",
                          choices=("hash", "size"))
    timeout: float = setting(60.0, "seconds a connection may stall before it counts as failed", gt=0.0)
    retries: int = setting(3, "further attempts for a shard that fails to open or breaks mid-read", ge=0)
    retry_backoff: float = setting(1.0, "seconds before the first retry, doubled for each next one", ge=0.0)
    skip_bad_shards: bool = setting(False, "skip a shard that still fails instead of stopping; the samples lost are "
                                    "counted in train_log.jsonl, val_log.jsonl and model.json (eval does not follow "
                                    "this: mcci eval --skip-bad-shards)")
    cache_dir: str = setting("", "keep verified remote shards here for later epochs (\"\" = stream every time)")
    cache_gb: float = setting(10.0, "the cache's bound; least recently used shards are evicted first (downloads in "
                              "progress, another worker's or rank's, never)", gt=0.0)
    # unset: the SFRN's pretrained input (timm's resolve_model_data_config), filled in when the model is built
    mean: tuple[float, float, float] | None = setting(None, "per-channel mean of the SFRN's input, 0..1 scale "
                                                      "(unset: the SFRN's pretrained config)", length=3)
    std: tuple[float, float, float] | None = setting(None, "per-channel std of the SFRN's input, 0..1 scale "
                                                     "(unset: the SFRN's pretrained config)", length=3, gt=0.0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    sfrn: str = setting("mcci_convnet_small", "the SFRN: any timm model name")
    drop_path_rate: float = setting(0.0, "stochastic depth of the SFRN (timm's drop_path_rate; e.g. 0.1 for ViT-B "
                                    "fine-tuning)", ge=0.0, lt=1.0)
    pretrained: str = setting("none", "none | hub (timm's hub loading, needs the network) | a weights file "
                              "(.safetensors, .pth): loaded, then checked tensor by tensor")
    feature_dim: int = setting(100, "SFRN and AIN output size before the fusion layer", ge=1)
    ain_widths: tuple[int, ...] = setting((32, 64, 128), "channels of the AIN's convolution blocks", ge=1)
    ain_dropouts: tuple[float, ...] = setting((0.2, 0.3, 0.4), "dropout after each AIN block", ge=0.0, lt=1.0)
    ain_stem_stride: int = setting(0, "stride of the AIN's first, strided convolution; 0: the reference "
                                   "(4 above 64 px, none up to 64)", ge=0)
    ain_budget: float = setting(0.0, "> 0: shrink the AIN (widths halved; above 64 px stem stride doubled) to at "
                                "most this fraction of the SFRN's forward FLOPs; the sizes chosen replace ain_widths and "
                                "ain_stem_stride in the saved config. 0: as the keys say", ge=0.0, lt=1.0)
    ain: str = setting("conv", "the AIN: conv, the reference CNN; matched, a linear read of its input averaged over "
                       "an ain_matched_grid grid (a matched filter for triggers added to the image; it cannot read the "
                       "image's class); conv+matched, both summed (docs/VARIANTS.md)", choices=AIN_KINDS)
    ain_matched_grid: int = setting(16, "cells a side of the grid the matched AIN averages its input over", ge=1)
    ain_view: str = setting("spectrum", "what the AIN sees: the image's spectrum; spectrum+lowpass: also the SFRN's "
                            "input low-passed (3 more channels), where smooth image-wide triggers live "
                            "(docs/VARIANTS.md)", choices=AIN_VIEWS)
    ain_lowpass_size: int = setting(16, "spectrum+lowpass: the image averaged over a grid of this many cells a side, "
                                    "then upsampled back (bilinear); finer patterns average out (>= the image "
                                    "size: no smoothing)", ge=1)


@dataclass
class SpectrumConfig:
    normalisation: str = setting("log", "log: sign(c)*log1p(|c|); raw: the reference code's unscaled coefficients",
                                 choices=("log", "raw"))
    backend: str = setting("torch", "DCT implementation", choices=("torch", "cupy", "scipy"))


@dataclass
class OptimConfig:
    name: str = setting("adamw", "optimiser", choices=("adamw", "adam", "adadelta", "sgd"))
    lr: float = setting(1e-3, "peak learning rate", gt=0.0)
    weight_decay: float = setting(0.05, "weight decay", ge=0.0)
    momentum: float = setting(0.9, "momentum (sgd only)", ge=0.0, lt=1.0)
    schedule: str = setting("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = setting(0.0, "linear warm-up length in epochs", ge=0.0)
    step_epochs: tuple[int, ...] = setting((30, 60, 90), "step schedule: multiply by step_gamma at these epochs", ge=1)
    step_gamma: float = setting(0.1, "step schedule's factor", gt=0.0, le=1.0)
    grad_clip: float = setting(5.0, "max global gradient norm; 0 disables", ge=0.0)
    # fine-tuning a pre-trained SFRN
    layer_decay: float = setting(1.0, "< 1: timm's layer-wise LR decay over the SFRN's blocks (e.g. 0.65 for ViT-B); "
                                 "1 = off", gt=0.0, le=1.0)
    head_lr_scale: float = setting(1.0, "LR multiplier for what is new at fine-tuning: the SFRN's classifier, the AIN, "
                                   "the fusion head", gt=0.0)
    probe_epochs: float = setting(0.0, "a linear probe first: only the new parameters learn; the body's warm-up "
                                  "starts after it", ge=0.0)
    ain_warmup_epochs: float = setting(0.0, "MCCI: epochs at the start in which the AIN alone learns (with its half "
                                       "of the head, on its own cross-entropy) while the whole SFRN waits: the "
                                       "poison's cue goes to the AIN before the SFRN can take it (the body's LR "
                                       "warm-up starts after)", ge=0.0)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", ge=0.0, lt=1.0)


@dataclass
class ReferenceConfig:
    kind: str = setting("feature", "feature: mean AIN output; spectrum: AIN output of the mean spectrum",
                        choices=("feature", "spectrum"))
    source: str = setting("trusted", "the shard split the reference images come from",
                          choices=("trusted", "train", "test-clean"))
    count: int = setting(100, "images averaged for the reference; 1 = a single image", ge=1)


@dataclass
class TrainConfig:
    defense: str = setting("mcci", "mcci, or none: the undefended baseline (the SFRN alone)", choices=("mcci", "none"))
    epochs: int = setting(10, "passes over the training split", ge=1)
    mixed_precision: str = setting("auto", "autocast precision; auto: the launcher's (accelerate launch "
                                   "--mixed_precision), else no; an explicit value wins over the launcher",
                                   choices=("auto", "no", "fp16", "bf16"))
    seed: int = setting(0, "seed of the model, the stream order and the augmentation", ge=0)
    out: str = setting("runs/default", "run folder: model/, checkpoints/, train_log.jsonl")
    log_every: int = setting(50, "steps between train_log.jsonl lines", ge=1)
    checkpoint_every: int = setting(0, "steps between checkpoints; 0 = at the end of each epoch only", ge=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept; 0 keeps every one", ge=0)
    resume: bool = setting(False, "continue from the newest complete checkpoint in out/checkpoints")
    cpu: bool = setting(False, "force the CPU even when a GPU is present")
    compile: str = setting("no", "torch.compile of the SFRN+AIN model (aot_eager, eager: debugging)",
                           choices=("no", "inductor", "aot_eager", "eager"))
    channels_last: bool = setting(False, "NHWC model and inputs: faster convolutions (AIN, CNN SFRNs) on tensor cores")
    mcci_variant: str = setting("none", "an MCCI variant that pushes what the AIN explains out of the SFRN "
                                "(docs/VARIANTS.md)", choices=MCCI_VARIANTS)
    mcci_variant_weight: float = setting(1.0, "the variant's weight: of its loss term (independence, lff, isolate), "
                                         "the exponent of the SFRN's share (residual, agreement)", ge=0.0)
    isolate_epoch: int = setting(1, "mcci_variant=isolate: epochs of plain MCCI before isolate_by's rule isolates "
                                 "training samples, which are unlearned from then on (run folder: isolation.json)",
                                 ge=1)
    isolate_by: str = setting("audit", "mcci_variant=isolate: audit: the samples whose label only the AIN explains "
                              "(dirty-label poison); loss: the isolate_fraction the model fits best (ABL's rule); "
                              "ain_loss: the isolate_fraction the AIN alone fits best",
                              choices=("audit", "loss", "ain_loss"))
    isolate_fraction: float = setting(0.1, "isolate_by=loss or ain_loss: the share of training samples isolated; at "
                                      "least the share feared poisoned (docs/VARIANTS.md)",
                                      gt=0.0, lt=1.0)
    grad_accumulation: int = setting(1, "micro-batches per optimiser step (Accelerate's accumulate); the effective "
                                     "batch is data.batch_size x this x processes", ge=1)
    freeze_bn_stats: bool = setting(False, "keep a pre-trained SFRN's BatchNorm running statistics (eval mode)")
    ema_decay: float = setting(0.0, "> 0: an EMA of the weights (timm's ModelEmaV3), validated beside them, "
                               "checkpointed and saved as the model's default weights (the raw ones beside it)",
                               ge=0.0, lt=1.0)
    ema_warmup: bool = setting(True, "timm's EMA warm-up: the decay grows from 0 towards ema_decay, so the EMA "
                               "forgets the starting weights (a run whose EMA would still be > 5 % its first "
                               "step's weights is refused)")
    eval_every: int = setting(1, "epochs between validations (CA/ASR/RA on the test splits, val_log.jsonl); 0 = off",
                              ge=0)
    trackers: tuple[str, ...] = setting(("auto",), "Accelerate trackers: auto (TensorBoard when installed), "
                                        "tensorboard, wandb, mlflow, none")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def keys(section: Any = None, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every config key as (dotted name, its field, its value in ``section``), depth first; the
    defaults when ``section`` is None."""
    section = Config() if section is None else section
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, value))
    return out


def _bounds(f: dataclasses.Field) -> str:
    """The key's bounds in words, e.g. ">= 0 and < 0.5"."""
    ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
    return " and ".join(f"{op} {f.metadata[name]:g}" for name, op in ops if name in f.metadata)


def _rules(f: dataclasses.Field) -> str:
    m = f.metadata
    parts = [" | ".join(m["choices"])] if "choices" in m else []
    parts += [f"{m['length']} values"] if "length" in m else []
    parts += [_bounds(f)] if _bounds(f) else []
    return f" ({', '.join(parts)})" if parts else ""


def describe_keys() -> str:
    """The text `mcci train --help` ends with: every key, its default, what it does and allows."""
    def shown(value: Any) -> str:
        return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                              width=1000).strip().removesuffix("\n...").strip()
    lines = ["config keys (set in the YAML file or as section.key=value; default first):"]
    for name, f, default in keys():
        lines.append(f"  {name} = {shown(default)}\n      {f.metadata['help']}{_rules(f)}")
    return "\n".join(lines)


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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping (a duplicate section or key) is an error
    naming both lines: PyYAML keeps the last one without a word, so an edit lower in a file silently undid one above."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may repeat what it merges
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = key in first
        except TypeError:  # an unhashable key: PyYAML's own constructor says what is wrong with it
            break
        line = first.setdefault(key, key_node.start_mark.line)
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice, on line {line + 1} and line {key_node.start_mark.line + 1} "
                "(YAML would keep only the last); keep one", None)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def strict_yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (``_StrictLoader``): for every file a user
    edits (configs, attack configs) and every override."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = strict_yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(e).split())}); "
                          "quote text, write lists as [1, 2]") from e
    return _nest(key.strip(), value)


def _check(key: str, f: dataclasses.Field, value: Any) -> None:
    if value is None:  # an optional key left unset
        return
    m = f.metadata
    shown = list(value) if isinstance(value, tuple) else value
    if "choices" in m and value not in m["choices"]:
        raise ConfigError(f"{key} must be one of {m['choices']}, got {value!r}")
    if "length" in m and len(value) != m["length"]:
        raise ConfigError(f"{key} must have {m['length']} values (one per RGB channel), got {len(value)}: {list(value)}")
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{key} must be a finite number, got {shown!r}")
        if isinstance(item, (int, float)) and not isinstance(item, bool) and (
                ("gt" in m and not item > m["gt"]) or ("ge" in m and not item >= m["ge"])
                or ("lt" in m and not item < m["lt"]) or ("le" in m and not item <= m["le"])):
            raise ConfigError(f"{key} must be {_bounds(f)}{' (each value)' if isinstance(value, tuple) else ''}, "
                              f"got {shown!r}")


def validate(cfg: Config) -> None:
    """Every key against its rules (``setting``), then what involves several keys or the file system."""
    for key, f, value in keys(cfg):
        _check(key, f, value)
    if cfg.model.pretrained in ("yes", "no"):  # a YAML true/false: the key was a bool before it named a source
        raise ConfigError("model.pretrained takes none, hub or a weights file path (true is now hub, false none)")
    augment = cfg.data.augment
    if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:  # config-only rules, so checked with the config
        if cfg.data.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pair each batch with itself reversed: data.batch_size must be even, "
                              f"got {cfg.data.batch_size}")
        if cfg.train.mcci_variant != "none":
            raise ConfigError(f"train.mcci_variant={cfg.train.mcci_variant} needs each sample's own label; mixup and "
                              "cutmix give soft labels: set data.augment.mixup_alpha=0 and cutmix_alpha=0")
    if len(cfg.model.ain_widths) != len(cfg.model.ain_dropouts):
        raise ConfigError("model.ain_widths and model.ain_dropouts must have the same length")
    if cfg.train.defense == "mcci" and not cfg.model.ain_widths:  # else an AIN of no block trains, named MCCI
        raise ConfigError("model.ain_widths=[] leaves MCCI without an AIN; give at least one block (the default is "
                          f"{list(Config().model.ain_widths)}), or set train.defense=none for the undefended model")
    for key in ("train.out", "data.shards"):
        path = Path(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))
        if str(path) and os.path.isfile(path):  # never raises (Path.is_file does on a name too long)
            raise ConfigError(f"{key}={path} is a file; name a folder")
    if cfg.train.mcci_variant == "isolate":
        if cfg.train.defense != "mcci":
            raise ConfigError("train.mcci_variant=isolate needs train.defense=mcci: its isolation reads the AIN")
        if cfg.train.isolate_epoch >= cfg.train.epochs:
            raise ConfigError(f"train.isolate_epoch={cfg.train.isolate_epoch} must be less than train.epochs="
                              f"{cfg.train.epochs}: isolation comes after that many epochs and unlearning after it; "
                              "lower train.isolate_epoch or raise train.epochs")
    if cfg.train.defense == "mcci" and cfg.optim.ain_warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"optim.ain_warmup_epochs={cfg.optim.ain_warmup_epochs:g} must be less than train.epochs="
                          f"{cfg.train.epochs}: the SFRN learns only after the AIN's warm-up")
    ratio = cfg.data.augment.ratio
    if len(ratio) != 2 or not ratio[0] <= ratio[1]:
        raise ConfigError(f"data.augment.ratio must be [low, high] with low <= high, got {list(ratio)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each override in order; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            state = "is a folder" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {state}; give a YAML file (see configs/ for examples)")
        try:
            data = strict_yaml_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path} as YAML: {' '.join(str(e).split())}; fix the file") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data, model, train, ...)")
        if isinstance(data.get("model"), dict):  # a config.yaml saved by an earlier version, in today's keys
            data = upgrade_config(data)
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
