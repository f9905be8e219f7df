"""The training job: ``mcci train --config FILE [key=value ...]`` or ``accelerate launch -m pipeline.train``
(``pipeline/train.py`` forwards here).

Reads top to bottom: build everything from the config, (maybe) resume, loop over epochs of
streamed batches, checkpoint, then fix the mind-control reference and save the model.
"""
from __future__ import annotations

import itertools
import json
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
from pipeline.components.checkpoint import checkpoint_dirs, load_training_state, save_model, save_training_state
from pipeline.components.evaluation import set_model_reference
from pipeline.components.flops import forward_flops
from pipeline.components.models import build_model, build_transform, model_meta
from pipeline.components.optim import build_optimizer, build_scheduler
from pipeline.data.loaders import steps_per_epoch, train_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prefetch import device_batches, resolve_decode
from pipeline.data.transforms import InputTransform, ModelInputs
from pipeline.support.config import Config, load_config
from pipeline.support.errors import ConfigError

TRAIN_LOG = "train_log.jsonl"


def classification_loss(model: nn.Module, inputs: ModelInputs, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model as trained: with each input's own spectrum for MCCI."""
    logits = model(inputs.images, inputs.spectra) if inputs.spectra is not None else model(inputs.images)
    return F.cross_entropy(logits.float(), labels)


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
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu)
    _check_out(cfg)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.out)
    manifest = load_manifest(cfg.data.shards)
    steps = steps_per_epoch(manifest, cfg.data.batch_size, accelerator.num_processes)
    total_steps = steps * cfg.train.epochs

    model = build_model(cfg, manifest["num_classes"], manifest["image_size"])
    if accelerator.is_main_process:
        _describe(model, manifest["image_size"], accelerator)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "no":
        model.compile(backend=cfg.train.compile)  # in place: parameter names and saved weights are unchanged
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps, total_steps)
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed sizes its buffers from this
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    transform = build_transform(cfg, seed=cfg.train.seed * 1000 + accelerator.process_index)
    decode = resolve_decode(cfg.data.decode, manifest["image_format"], accelerator.device)

    step, start_epoch = 0, 0
    if cfg.train.resume and checkpoint_dirs(out):
        state = load_training_state(accelerator, checkpoint_dirs(out)[-1])
        step, start_epoch = state["step"], state["epoch"]
        _restore_augment_rng(transform, state["augment_rng"], accelerator)
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        accelerator.print(f"resumed from step {step} (epoch {start_epoch}) of {total_steps}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def checkpoint(epoch: int) -> None:
        # The schedule and the augmentation RNG go to JSON: Accelerate would pickle registered
        # objects and unpickle them with weights_only=False on resume.
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_training_state(accelerator, out, {"step": step, "epoch": epoch, "total_steps": total_steps,
                                               # every rank's stream: each augments its own batches
                                               "augment_rng": gather_object([transform.generator.get_state().tolist()]),
                                               "scheduler": scheduler_state}, cfg.train.keep_checkpoints)

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, unit="step",
               dynamic_ncols=True, file=sys.stdout)
    log = open(out / TRAIN_LOG, "a") if accelerator.is_main_process else None
    window_start, window_images = time.perf_counter(), 0
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        loader = train_loader(cfg.data.shards, manifest, cfg.data.batch_size, steps, cfg.data.num_workers,
                              cfg.data.shuffle_buffer, seed=cfg.train.seed * 7919 + accelerator.process_index,
                              epoch=epoch, decode=decode)
        # After a mid-epoch resume, replay the epoch's seeded stream up to where the checkpoint was
        # taken: the data order (and so the result) matches an uninterrupted run.
        for batch in device_batches(itertools.islice(loader, step - epoch * steps, None), accelerator.device):
            inputs = transform(batch.images, train=True)
            with accelerator.autocast():
                loss = classification_loss(model, inputs, batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr, enable "
                                         "optim.grad_clip, or use spectrum.normalisation=log")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
            optimizer.step()
            scheduler.step()
            step += 1
            window_images += batch.labels.numel() * accelerator.num_processes
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5),
                          "lr": scheduler.get_last_lr()[0], "images_per_s": round(window_images / elapsed, 1),
                          "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)}
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                window_start, window_images = time.perf_counter(), 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total_steps:
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
