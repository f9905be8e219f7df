"""The training job: ``mcci train --config FILE [key=value ...]`` or ``accelerate launch -m pipeline.train``
(``pipeline/train.py`` forwards here).

Reads top to bottom: build everything from the config, (maybe) resume, loop over epochs of
streamed batches, checkpoint, then fix the mind-control reference and save the model.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm import tqdm

from mcci_models import MCCI
from mcci_models.saved import MODEL_DIR
from pipeline.components.checkpoint import (TRAINER_STATE, checkpoint_dirs, load_training_state, save_model,
                                           save_training_state)
from pipeline.components.evaluation import set_model_reference
from pipeline.components.flops import forward_flops
from pipeline.components.models import build_model, build_transform, model_meta
from pipeline.components.optim import build_optimizer, build_scheduler
from pipeline.data.loaders import steps_per_epoch, train_loader
from pipeline.data.manifest import fingerprint, load_manifest
from pipeline.data.prefetch import device_batches, resolve_decode
from pipeline.data.transforms import InputTransform, ModelInputs
from pipeline.support.config import Config, load_config, to_dict
from pipeline.support.errors import ConfigError, JobError, ShardError
from pipeline.support.report import write_text

TRAIN_LOG = "train_log.jsonl"


def classification_loss(model: nn.Module, inputs: ModelInputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model as trained: with each input's own spectrum for MCCI."""
    logits = model(inputs.images, inputs.spectra) if inputs.spectra is not None else model(inputs.images)
    return F.cross_entropy(logits.float(), labels)


# What defines a run: resuming with any of these changed would not continue the same run.
RUN_SECTIONS = ("model", "spectrum", "optim")
RUN_KEYS = ("data.batch_size", "data.num_workers", "data.shuffle_buffer", "data.mean", "data.std", "data.augment",
            "train.defense", "train.epochs", "train.seed", "train.mixed_precision")
FP16_MAX = 65504.0


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
    """Refuse to resume a run whose data, model, recipe or shape changed, naming every changed key."""
    if saved is None:  # a checkpoint written before identities were recorded
        return
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(f"cannot resume: the checkpoint's run differs in {'; '.join(changed)}; restore those "
                          "values, or start a new run with another train.out")


def resolve_mixed_precision(cfg: Config, report) -> str:
    """One source: ``train.mixed_precision`` when set, else the launcher's (``accelerate launch
    --mixed_precision``, which sets ACCELERATE_MIXED_PRECISION), else ``no``. A disagreement is reported."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if cfg.train.mixed_precision == "auto":
        return launcher or "no"
    if launcher and launcher != cfg.train.mixed_precision:
        report(f"warning: the launcher asks for mixed precision {launcher!r} but train.mixed_precision="
               f"{cfg.train.mixed_precision!r}, which wins; set train.mixed_precision=auto to follow the launcher")
    return cfg.train.mixed_precision


def check_data_for_run(cfg: Config, manifest: dict[str, Any], mixed_precision: str) -> None:
    """What the config asks of the data, checked before any step is taken."""
    size = manifest["image_size"]
    if cfg.train.defense == "mcci":
        available = manifest["splits"].get(cfg.reference.source, {}).get("count", 0)
        if available == 0:
            raise ShardError(f"reference.source={cfg.reference.source!r} has no images in {cfg.data.shards}; build "
                             "shards with --trusted-count > 0 or set reference.source=train")
        if cfg.reference.count > available:
            raise ConfigError(f"reference.count={cfg.reference.count} is more than the {available} images of "
                              f"reference.source={cfg.reference.source!r}; set reference.count<={available}")
        if cfg.spectrum.normalisation == "raw" and mixed_precision == "fp16" and 255.0 * size > FP16_MAX:
            raise ConfigError(f"spectrum.normalisation=raw at {size} px overflows fp16 (the DC coefficient reaches "
                              f"255*{size} = {255 * size}, fp16 holds {FP16_MAX:.0f}); use spectrum.normalisation=log "
                              "or train.mixed_precision=bf16")


def seed_rank_randomness(seed: int, rank: int) -> None:
    """Seed the global RNGs per rank, after the model is built (identical on every rank), so dropout
    and drop-path masks differ across ranks; the data order has seeds of its own."""
    set_seed(seed + rank)


def deepspeed_input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed casts the model to bf16/fp16 and runs without autocast, so float inputs must be cast
    to match (as the Hugging Face Trainer does); None when the model keeps fp32 weights."""
    if accelerator.state.deepspeed_plugin is None:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def configure_deepspeed(deepspeed_config: dict[str, Any], cfg: Config) -> None:
    """Write what DeepSpeed takes from its own config: the micro-batch (it sizes buffers from it) and
    the gradient clipping (Accelerate's "auto" would put its own constant there; 0 disables)."""
    deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    deepspeed_config["gradient_clipping"] = cfg.optim.grad_clip


def model_inputs(transform: InputTransform, images: torch.Tensor, dtype: torch.dtype | None) -> ModelInputs:
    """Augmented SFRN input and spectrum (always computed in fp32), cast to ``dtype`` when given."""
    inputs = transform(images, train=True)
    if dtype is None:
        return inputs
    return ModelInputs(inputs.images.to(dtype), None if inputs.spectra is None else inputs.spectra.to(dtype))


def train_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               inputs: ModelInputs, labels: torch.Tensor, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimiser step; returns the loss and the gradient norm before clipping, as device tensors
    (no host sync here: the loop reads them on logging steps only)."""
    with accelerator.autocast():
        loss = classification_loss(model, inputs, labels)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    optimizer.step()
    scheduler.step()
    return loss.detach(), grad_norm


def check_finite(loss: torch.Tensor, step: int, last_checked: int) -> None:
    value = float(loss)
    if not torch.isfinite(torch.tensor(value)):
        raise JobError(f"the training loss is {value} at step {step} (finite at step {last_checked}, the last check); "
                       "lower optim.lr, set optim.grad_clip > 0, or use spectrum.normalisation=log")


def trim_log(path: Path, last_step: int) -> None:
    """Drop log records past the checkpoint a run resumes from: those steps run again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= last_step]
        write_text(path, "".join(kept))


def _check_out(cfg: Config) -> None:
    out = Path(cfg.train.out)
    if cfg.train.resume:
        return
    if (out / MODEL_DIR).exists() or checkpoint_dirs(out):
        raise ConfigError(f"{out} already holds a training run; set train.resume=true to continue it "
                          "or choose another train.out")


def _describe(model: nn.Module, image_size: int, accelerator: Accelerator) -> None:
    if isinstance(model, MCCI):
        sfrn = forward_flops(model.sfrn, (1, 3, image_size, image_size))
        ain = forward_flops(model.ain, (1, 3, image_size, image_size))
        accelerator.print(f"SFRN {sum(p.numel() for p in model.sfrn.parameters()) / 1e6:.2f}M params, "
                          f"{sfrn / 1e9:.3f} GFLOPs/image; AIN {sum(p.numel() for p in model.ain.parameters()) / 1e6:.2f}M "
                          f"params, {ain / 1e9:.3f} GFLOPs/image ({100 * ain / sfrn:.1f}% of the SFRN)")
    else:
        flops = forward_flops(model, (1, 3, image_size, image_size))
        accelerator.print(f"SFRN (no defense) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                          f"{flops / 1e9:.3f} GFLOPs/image")


def _restore_augment_rng(transform: InputTransform, states: list, accelerator: Accelerator) -> None:
    """This rank's augmentation RNG from a checkpoint's per-rank states (older checkpoints hold one)."""
    if states and isinstance(states[0], int):
        states = [states]
    if len(states) != accelerator.num_processes:
        accelerator.print(f"checkpoint from {len(states)} processes resumed on {accelerator.num_processes}: "
                          "augmentation restarts from its seeds, so the run will not repeat the original exactly")
        return
    transform.load_state_dict({"generator": torch.tensor(states[accelerator.process_index], dtype=torch.uint8)})


def train(cfg: Config) -> Path:
    """Run the job; returns the saved model folder."""
    mixed_precision = resolve_mixed_precision(cfg, print)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cfg.train.cpu)
    _check_out(cfg)
    set_seed(cfg.train.seed)  # the same initial weights on every rank
    out = Path(cfg.train.out)
    manifest = load_manifest(cfg.data.shards)
    check_data_for_run(cfg, manifest, mixed_precision)
    steps = steps_per_epoch(manifest, cfg.data.batch_size, accelerator.num_processes)
    total_steps = steps * cfg.train.epochs
    identity = run_identity(cfg, manifest, accelerator.num_processes, mixed_precision)

    model = build_model(cfg, manifest["num_classes"], manifest["image_size"])
    if accelerator.is_main_process:
        _describe(model, manifest["image_size"], accelerator)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "no":
        model.compile(backend=cfg.train.compile)  # in place: parameter names and saved weights are unchanged
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_rank_randomness(cfg.train.seed, accelerator.process_index)
    input_dtype = deepspeed_input_dtype(accelerator)
    transform = build_transform(cfg, seed=cfg.train.seed * 1000 + accelerator.process_index)
    decode = resolve_decode(cfg.data.decode, manifest["image_format"], accelerator.device)

    step, start_epoch = 0, 0
    if cfg.train.resume and checkpoint_dirs(out):
        newest = checkpoint_dirs(out)[-1]
        check_resume_identity(json.loads((newest / TRAINER_STATE).read_text()).get("run"), identity)
        state = load_training_state(accelerator, newest)
        step, start_epoch = state["step"], state["epoch"]
        if accelerator.is_main_process:
            trim_log(out / TRAIN_LOG, step)
        _restore_augment_rng(transform, state["augment_rng"], accelerator)
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        accelerator.print(f"resumed from step {step} (epoch {start_epoch}) of {total_steps}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def checkpoint(epoch: int) -> None:
        # The schedule and the augmentation RNG go to JSON: Accelerate would pickle registered
        # objects and unpickle them with weights_only=False on resume.
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_training_state(accelerator, out, {"step": step, "epoch": epoch, "total_steps": total_steps, "run": identity,
                                               # every rank's stream: each augments its own batches
                                               "augment_rng": gather_object([transform.generator.get_state().tolist()]),
                                               "scheduler": scheduler_state}, cfg.train.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, unit="step",
               dynamic_ncols=True, file=sys.stdout)
    log = open(out / TRAIN_LOG, "a") if accelerator.is_main_process else None
    window_start, window_images, last_checked = time.perf_counter(), 0, step
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        loader = train_loader(cfg.data.shards, manifest, cfg.data.batch_size, steps, cfg.data.num_workers,
                              cfg.data.shuffle_buffer, seed=cfg.train.seed * 7919 + accelerator.process_index,
                              epoch=epoch, decode=decode)
        # After a mid-epoch resume, replay the epoch's seeded stream up to where the checkpoint was
        # taken: the data order (and so the result) matches an uninterrupted run.
        for batch in device_batches(itertools.islice(loader, step - epoch * steps, None), accelerator.device):
            inputs = model_inputs(transform, batch.images, input_dtype)
            loss, grad_norm = train_step(accelerator, model, optimizer, scheduler, inputs, batch.labels,
                                         cfg.optim.grad_clip)
            step += 1
            window_images += batch.labels.numel() * accelerator.num_processes
            bar.update(1)
            checkpoint_due = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
            if step % cfg.train.log_every == 0 or step == total_steps or checkpoint_due or step % steps == 0:
                check_finite(loss, step, last_checked)  # the only host sync of a step, and only on these steps
                last_checked = step
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5),
                          "lr": scheduler.get_last_lr()[0], "images_per_s": round(window_images / elapsed, 1),
                          "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)}
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                window_start, window_images, last_checked = time.perf_counter(), 0, step
            if checkpoint_due and step < total_steps:
                checkpoint(epoch)
        checkpoint(epoch + 1)
    bar.close()
    if log:
        log.close()
        from pipeline.support.plots import TRAIN_CURVES, plot_training_log

        plot_training_log(out / TRAIN_LOG, out / TRAIN_CURVES)
    return save_trained_model(accelerator, model, cfg, manifest, transform)


def save_trained_model(accelerator: Accelerator, model: nn.Module, cfg: Config, manifest: dict[str, Any],
                       transform: InputTransform) -> Path:
    """Fix the mind-control reference (MCCI) and write ``<out>/model`` on the main process."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    model_dir = Path(cfg.train.out) / MODEL_DIR
    if accelerator.is_main_process:
        plain = build_model(cfg, manifest["num_classes"], manifest["image_size"], load_pretrained=False)
        plain.load_state_dict(state_dict)
        meta = model_meta(cfg, manifest)
        if isinstance(plain, MCCI):
            r = cfg.reference
            meta["reference"] = set_model_reference(plain.to(accelerator.device), cfg.data.shards, manifest, r.kind,
                                                    r.source, r.count, transform, accelerator.device)
        save_model(model_dir, plain.state_dict(), cfg, meta)
        accelerator.print(f"saved {model_dir}")
    accelerator.wait_for_everyone()
    return model_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="mcci train", description="Train an MCCI model (or the undefended baseline).")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.epochs=5")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
