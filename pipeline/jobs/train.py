"""The training job: ``mcci train --config FILE [key=value ...]`` or ``accelerate launch -m pipeline.train``
(``pipeline/train.py`` forwards here).

Reads top to bottom: build everything from the config, (maybe) resume, loop over epochs of
streamed batches (with ``train.mcci_variant=isolate``, isolate after ``train.isolate_epoch`` of them),
checkpoint, then fix the mind-control reference and save the model.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from mcci_models import MCCI, sfrn_data_config
from mcci_models.flops import forward_flops
from mcci_models.saved import MODEL_DIR
from pipeline.components.checkpoint import (TRAINER_STATE, checkpoint_dirs, load_training_state, save_model,
                                           save_training_state)
from pipeline.components.distributed import (configure_deepspeed, deepspeed_input_dtype, resolve_mixed_precision,
                                             seed_rank_randomness, shards_parameters)
from pipeline.components.evaluation import set_model_reference
from pipeline.components.isolation import ISOLATION, describe_isolation, isolate
from pipeline.components.losses import training_loss
from pipeline.components.models import build_model, build_transform, model_meta
from pipeline.components.optim import build_optimizer, build_scheduler
from pipeline.components.run_checks import check_data_for_run, check_resume_identity, run_identity
from pipeline.components.trackers import flat_config, resolve_trackers
from pipeline.components.validation import VAL_LOG, describe, validate
from pipeline.data.loaders import steps_per_epoch, train_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prefetch import device_batches, resolve_decode
from pipeline.data.storage import StreamOptions
from pipeline.data.transforms import InputTransform, ModelInputs
from pipeline.support.config import Config, load_config
from pipeline.support.errors import CheckpointError, ConfigError, JobError
from pipeline.support.plots import TRAIN_CURVES, VAL_CURVES, plot_training_log, plot_validation_log
from pipeline.support.report import write_json, write_text

TRAIN_LOG = "train_log.jsonl"


def model_inputs(transform: InputTransform, images: torch.Tensor, dtype: torch.dtype | None,
                 labels: torch.Tensor | None = None) -> ModelInputs:
    """Augmented (and, with ``labels`` and mixup on, mixed) SFRN input and spectrum (always computed in
    fp32), cast to ``dtype`` when given."""
    inputs = transform(images, train=True, labels=labels)
    if dtype is None:
        return inputs
    return ModelInputs(inputs.images.to(dtype), None if inputs.spectra is None else inputs.spectra.to(dtype),
                       inputs.targets)


def train_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               inputs: ModelInputs, labels: torch.Tensor, grad_clip: float,
               loss_fn: Callable[..., torch.Tensor] = training_loss) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: forward, backward and, once ``train.grad_accumulation`` micro-batches are in,
    the optimiser step (Accelerate's ``accumulate``). Returns the loss and the gradient norm before
    clipping (None between optimiser steps) as device tensors: no host sync here."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = loss_fn(model, inputs, labels)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()  # Accelerate's wrapper steps only on the last micro-batch
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def set_train_mode(model: nn.Module, network: nn.Module, freeze_bn_stats: bool) -> None:
    """Training mode for ``model`` (as prepared: DDP may wrap it); with ``freeze_bn_stats`` the BatchNorm
    layers of ``network``'s (the unwrapped model's) SFRN stay in eval mode, so a pre-trained backbone keeps
    its running statistics (the AIN's, trained from scratch, still learn)."""
    model.train()
    if freeze_bn_stats:
        for module in getattr(network, "sfrn", network).modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def check_finite(loss: torch.Tensor, step: int, last_checked: int) -> None:
    value = float(loss)
    if not torch.isfinite(torch.tensor(value)):
        raise JobError(f"the training loss is {value} at step {step} (finite at step {last_checked}, the last check); "
                       "lower optim.lr, set optim.grad_clip > 0, or use spectrum.normalisation=log")


def trim_logs(out: Path, last_step: int) -> None:
    """Drop log records past the checkpoint a run resumes from: those steps run again."""
    for path in (out / TRAIN_LOG, out / VAL_LOG):
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
        ain = forward_flops(model.ain, (1, *model.reference_spectrum.shape))  # the AIN's input: its view's channels
        accelerator.print(f"SFRN {sum(p.numel() for p in model.sfrn.parameters()) / 1e6:.2f}M params, "
                          f"{sfrn / 1e9:.3f} GFLOPs/image; AIN {sum(p.numel() for p in model.ain.parameters()) / 1e6:.2f}M "
                          f"params, {ain / 1e9:.3f} GFLOPs/image ({100 * ain / sfrn:.1f}% of the SFRN)")
    else:
        flops = forward_flops(model, (1, 3, image_size, image_size))
        accelerator.print(f"SFRN (no defense) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                          f"{flops / 1e9:.3f} GFLOPs/image")


def _note_pretrained_input(cfg: Config, manifest: dict[str, Any], accelerator: Accelerator) -> None:
    """A pre-trained SFRN saw its images cut one way (timm's crop_pct); say so when the shards differ."""
    if cfg.model.pretrained == "none":
        return
    expected = sfrn_data_config(cfg.model.sfrn).get("crop_pct", 1.0)
    built = manifest.get("build", {}).get("crop_pct", 1.0)
    if abs(expected - built) > 1e-6:
        accelerator.print(f"note: the shards were cut with crop_pct {built:g}; {cfg.model.sfrn}'s pretrained "
                          f"config uses {expected:g} (`mcci shards build --crop-pct {expected:g}` matches it)")


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
    out = Path(cfg.train.out)
    trackers = resolve_trackers(cfg.train.trackers)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cfg.train.cpu, log_with=trackers or None,
                              project_dir=str(out), gradient_accumulation_steps=cfg.train.grad_accumulation)
    _check_out(cfg)
    set_seed(cfg.train.seed)  # the same initial weights on every rank
    stream = StreamOptions.from_config(cfg.data)  # how shards are read: verification, retries, cache
    manifest = load_manifest(cfg.data.shards, stream)
    steps = steps_per_epoch(manifest, cfg.data.batch_size, accelerator.num_processes)  # micro-batches
    check_data_for_run(cfg, manifest, mixed_precision, steps)
    total_steps = steps * cfg.train.epochs
    identity = run_identity(cfg, manifest, accelerator.num_processes, mixed_precision)

    model = build_model(cfg, manifest["num_classes"], manifest["image_size"])
    if accelerator.is_main_process:
        _describe(model, manifest["image_size"], accelerator)
        _note_pretrained_input(cfg, manifest, accelerator)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "no":
        model.compile(backend=cfg.train.compile)  # in place: parameter names and saved weights are unchanged
    optimizer = build_optimizer(model, cfg.optim)
    accumulation = cfg.train.grad_accumulation  # the schedule counts optimiser steps
    scheduler = build_scheduler(optimizer, cfg.optim, steps // accumulation, total_steps // accumulation)
    if accelerator.state.deepspeed_plugin is not None:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)
    sharded = shards_parameters(accelerator)
    if cfg.train.ema_decay > 0 and sharded:
        raise ConfigError("train.ema_decay needs whole parameters on each rank; ZeRO-3 and FSDP shard them: "
                          "set train.ema_decay=0 or use DDP / ZeRO-2")
    if cfg.train.ema_decay > 0 and deepspeed_input_dtype(accelerator) is not None:
        raise ConfigError("train.ema_decay under DeepSpeed with bf16/fp16 weights would keep the EMA in that dtype, "
                          "where its small updates round away: set train.ema_decay=0, or train without DeepSpeed "
                          "(DDP keeps fp32 weights under autocast)")
    isolating = cfg.train.mcci_variant == "isolate" and cfg.train.defense == "mcci"
    if isolating and sharded:
        raise ConfigError("train.mcci_variant=isolate scores every training sample with the whole model on each rank; "
                          "ZeRO-3 and FSDP shard the parameters: use DDP / ZeRO-2, or another train.mcci_variant")
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    seed_rank_randomness(cfg.train.seed, accelerator.process_index)
    input_dtype = deepspeed_input_dtype(accelerator)
    transform = build_transform(cfg, seed=cfg.train.seed * 1000 + accelerator.process_index,
                                device=accelerator.device, num_classes=manifest["num_classes"])
    loss_fn = partial(training_loss, label_smoothing=cfg.optim.label_smoothing, variant=cfg.train.mcci_variant,
                      weight=cfg.train.mcci_variant_weight)
    decode = resolve_decode(cfg.data.decode, manifest["image_format"], accelerator.device)
    # isolate: the switch's record, and the isolated sample indices on the device (None before the switch)
    isolation: dict[str, Any] | None = None
    flagged: torch.Tensor | None = None

    step, start_epoch = 0, 0
    if cfg.train.resume and checkpoint_dirs(out):
        newest = checkpoint_dirs(out)[-1]
        check_resume_identity(json.loads((newest / TRAINER_STATE).read_text()).get("run"), identity)
        state, ema_weights = load_training_state(accelerator, newest)
        step, start_epoch = state["step"], state["epoch"]
        if ema is not None:  # a checkpoint without one (written before identities) restarts it from the weights
            ema.module.load_state_dict(ema_weights or accelerator.unwrap_model(model).state_dict())
        if accelerator.is_main_process:
            trim_logs(out, step)
        _restore_augment_rng(transform, state["augment_rng"], accelerator)
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        isolation = state.get("isolation")
        if isolating and isolation is None and start_epoch >= cfg.train.isolate_epoch:
            raise CheckpointError(f"{newest} was written after the isolation epoch but holds no isolated samples; "
                                  "start a new run with another train.out")
        if isolation is not None:
            flagged = torch.tensor(isolation["flagged_indices"], dtype=torch.long, device=accelerator.device)
            if accelerator.is_main_process and not (out / ISOLATION).exists():
                write_json(out / ISOLATION, isolation)
        accelerator.print(f"resumed from step {step} (epoch {start_epoch}) of {total_steps}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if trackers:
        accelerator.init_trackers("mcci", config=flat_config(cfg))

    def checkpoint(epoch: int) -> None:
        # The schedule and the augmentation RNG go to JSON: Accelerate would pickle registered
        # objects and unpickle them with weights_only=False on resume.
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_training_state(accelerator, out, {"step": step, "epoch": epoch, "total_steps": total_steps, "run": identity,
                                               # every rank's stream: each augments its own batches
                                               "augment_rng": gather_object([transform.generator.get_state().tolist()]),
                                               "scheduler": scheduler_state, "isolation": isolation},
                            cfg.train.keep_checkpoints,
                            ema=None if ema is None else ema.module.state_dict())

    # off the training step: DeepSpeed's bf16/fp16 weights take fp32 inputs only under autocast
    eval_autocast = (lambda: torch.autocast(accelerator.device.type, dtype=input_dtype)) if input_dtype \
        else accelerator.autocast

    def run_validation(epoch: int) -> None:
        candidates = [("raw", accelerator.unwrap_model(model))] + ([("ema", ema.module)] if ema is not None else [])
        for weights, candidate in candidates:
            results = validate(candidate, cfg, manifest, transform, accelerator.device, eval_autocast,
                               lambda t: accelerator.reduce(t, "sum"))
            accelerator.print(describe(epoch + 1, weights, results))
            if val_log:
                for mode, metrics in results.items():
                    val_log.write(json.dumps({"step": step, "epoch": epoch + 1, "weights": weights, "mode": mode,
                                              **metrics}) + "\n")
                val_log.flush()
            accelerator.log({f"val/{weights}/{mode}/{k}": v for mode, m in results.items() for k, v in m.items()},
                            step=step)

    def run_isolation(epoch: int) -> None:
        nonlocal isolation, flagged
        isolation = {"epoch": epoch + 1, "step": step,
                     **isolate(accelerator.unwrap_model(model), cfg, manifest, transform, accelerator.device,
                               eval_autocast)}
        flagged = torch.tensor(isolation["flagged_indices"], dtype=torch.long, device=accelerator.device)
        accelerator.print(describe_isolation(isolation))
        if accelerator.is_main_process:
            write_json(out / ISOLATION, isolation)
        truth = isolation.get("recorded_poisoned", {})
        accelerator.log({"isolation/flagged": isolation["flagged"],
                         **{f"isolation/{k}": truth[k] for k in ("precision", "recall") if k in truth}}, step=step)

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, unit="step",
               dynamic_ncols=True, file=sys.stdout)
    log = open(out / TRAIN_LOG, "a") if accelerator.is_main_process else None
    val_log = open(out / VAL_LOG, "a") if accelerator.is_main_process else None
    validating = cfg.train.eval_every > 0 and not sharded
    if cfg.train.eval_every > 0 and sharded:
        accelerator.print("validation during training is off: ZeRO-3 / FSDP shard the parameters; run `mcci eval` "
                          "on the saved model")
    window_start, window_images, last_checked = time.perf_counter(), 0, step
    for epoch in range(start_epoch, cfg.train.epochs):
        set_train_mode(model, accelerator.unwrap_model(model), cfg.train.freeze_bn_stats)
        loader = train_loader(cfg.data.shards, manifest, cfg.data.batch_size, steps, cfg.data.num_workers,
                              cfg.data.shuffle_buffer, seed=cfg.train.seed * 7919 + accelerator.process_index,
                              epoch=epoch, decode=decode, stream=stream)
        # After a mid-epoch resume, replay the epoch's seeded stream up to where the checkpoint was
        # taken: the data order (and so the result) matches an uninterrupted run.
        for batch in device_batches(itertools.islice(loader, step - epoch * steps, None), accelerator.device):
            inputs = model_inputs(transform, batch.images, input_dtype, batch.labels)
            # after the isolation switch, the loss unlearns the batch's isolated samples
            step_loss = loss_fn if flagged is None else partial(loss_fn, flagged=torch.isin(batch.indices, flagged))
            loss, grad_norm = train_step(accelerator, model, optimizer, scheduler, inputs, batch.labels,
                                         cfg.optim.grad_clip, step_loss)
            step += 1
            if ema is not None and accelerator.sync_gradients:
                ema.update(accelerator.unwrap_model(model), step=step // accumulation)
            window_images += batch.labels.numel() * accelerator.num_processes
            bar.update(1)
            checkpoint_due = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
            if step % cfg.train.log_every == 0 or step == total_steps or checkpoint_due or step % steps == 0:
                # the mean over ranks: all stop together on a non-finite loss (none waits in the next all-reduce);
                # the only host sync of a step, and only on these steps
                loss = accelerator.reduce(loss, "mean")
                check_finite(loss, step, last_checked)
                last_checked = step
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5),
                          "lr": max(scheduler.get_last_lr()), "images_per_s": round(window_images / elapsed, 1),
                          "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)}
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                accelerator.log({f"train/{k}": v for k, v in record.items() if v is not None and k != "step"},
                                step=step)
                window_start, window_images = time.perf_counter(), 0
            if checkpoint_due and step < total_steps:
                checkpoint(epoch)
        if validating and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
            run_validation(epoch)
        if isolating and epoch + 1 == cfg.train.isolate_epoch:
            run_isolation(epoch)
        checkpoint(epoch + 1)
    bar.close()
    if log:
        log.close()
        val_log.close()
        plot_training_log(out / TRAIN_LOG, out / TRAIN_CURVES)
        plot_validation_log(out / VAL_LOG, out / VAL_CURVES)
    model_dir = save_trained_model(accelerator, model if ema is None else ema.module, cfg, manifest, transform)
    accelerator.end_training()  # closes the trackers (and the process group): last
    return model_dir


def save_trained_model(accelerator: Accelerator, model: nn.Module, cfg: Config, manifest: dict[str, Any],
                       transform: InputTransform) -> Path:
    """Fix the mind-control reference (MCCI) and write ``<out>/model`` on the main process (the EMA
    weights when the run keeps an EMA)."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    model_dir = Path(cfg.train.out) / MODEL_DIR
    if accelerator.is_main_process:
        plain = build_model(cfg, manifest["num_classes"], manifest["image_size"], load_pretrained=False)
        plain.load_state_dict(state_dict)
        meta = model_meta(cfg, manifest)
        if isinstance(plain, MCCI):
            r = cfg.reference
            meta["reference"] = set_model_reference(plain.to(accelerator.device), cfg.data.shards, manifest, r.kind,
                                                    r.source, r.count, transform, accelerator.device,
                                                    StreamOptions.from_config(cfg.data))
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
