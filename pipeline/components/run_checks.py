"""What a run must agree with before it starts: the data it is given, and the checkpoint it resumes."""
from __future__ import annotations

from typing import Any

from pipeline.data.manifest import fingerprint
from pipeline.support.config import Config, keys, to_dict
from pipeline.support.errors import ConfigError, ShardError

# What defines a run: resuming with any of these changed would not continue the same run.
RUN_SECTIONS = ("model", "spectrum", "optim", "reference")
RUN_KEYS = ("data.batch_size", "data.num_workers", "data.shuffle_buffer", "data.mean", "data.std", "data.augment",
            "data.decode", "data.in_memory",
            "train.defense", "train.epochs", "train.seed", "train.mixed_precision", "train.grad_accumulation",
            "train.mcci_variant", "train.mcci_variant_weight", "train.isolate_epoch", "train.isolate_by",
            "train.isolate_fraction", "train.freeze_bn_stats", "train.ema_decay", "train.ema_warmup")
FP16_MAX = 65504.0
# every key's default, as an identity holds it: a key added after a checkpoint was written is unchanged at its default
DEFAULTS = {name: list(value) if isinstance(value, tuple) else value for name, _, value in keys()}


def run_identity(cfg: Config, manifest: dict[str, Any], world_size: int, mixed_precision: str) -> dict[str, Any]:
    """The keys a resume must find unchanged, flattened (``optim.lr``, ``data.fingerprint``, ...)."""
    plain = to_dict(cfg)
    plain["train"]["mixed_precision"] = mixed_precision
    identity: dict[str, Any] = {"data.fingerprint": fingerprint(manifest), "data.attack": manifest["attack"]["name"],
                                "world_size": world_size}
    for section in RUN_SECTIONS:
        identity.update({f"{section}.{k}": v for k, v in plain[section].items()})
    for key in RUN_KEYS:
        section, name = key.split(".", 1)
        identity[key] = plain[section][name]
    return identity


def check_resume_identity(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a run whose data, model, recipe or shape changed, naming every changed key. A key the
    checkpoint does not hold (added since it was written) counts as unchanged while it keeps its default."""
    if saved is None:  # a checkpoint written before identities were recorded
        return
    def same(k: str) -> bool:
        if k not in saved and k in DEFAULTS:
            return current.get(k) == DEFAULTS[k]
        return saved.get(k) == current.get(k)

    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if not same(k)]
    if changed:
        raise ConfigError(f"cannot resume: the checkpoint's run differs in {'; '.join(changed)}; restore those "
                          "values, or start a new run with another train.out")


def check_data_for_run(cfg: Config, manifest: dict[str, Any], mixed_precision: str, steps_per_epoch: int) -> None:
    """What the config asks of the data, checked before any step is taken."""
    size = manifest["image_size"]
    accumulation = cfg.train.grad_accumulation
    # optimiser steps end where epochs and checkpoints do, so a resume starts on a whole step
    if steps_per_epoch % accumulation or cfg.train.checkpoint_every % accumulation:
        raise ConfigError(f"train.grad_accumulation={accumulation} must divide the {steps_per_epoch} batches of an "
                          f"epoch and train.checkpoint_every={cfg.train.checkpoint_every}; choose a divisor of both")
    if cfg.train.defense == "mcci":
        available = manifest["splits"].get(cfg.reference.source, {}).get("count", 0)
        if available == 0:  # the fix depends on the split: only the trusted one is sized by --trusted-count
            fix = ("build shards with --trusted-count > 0 or set reference.source=train" if cfg.reference.source ==
                   "trusted" else "set reference.source to a split that has images (trusted, train, test-clean)")
            raise ShardError(f"reference.source={cfg.reference.source!r} has no images in {cfg.data.shards}; {fix}")
        if cfg.reference.count > available:
            raise ConfigError(f"reference.count={cfg.reference.count} is more than the {available} images of "
                              f"reference.source={cfg.reference.source!r}; set reference.count<={available}")
        if cfg.spectrum.normalisation == "raw" and mixed_precision == "fp16" and 255.0 * size > FP16_MAX:
            raise ConfigError(f"spectrum.normalisation=raw at {size} px overflows fp16 (the DC coefficient reaches "
                              f"255*{size} = {255 * size}, fp16 holds {FP16_MAX:.0f}); use spectrum.normalisation=log "
                              "or train.mixed_precision=bf16")
