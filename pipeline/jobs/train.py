"""The training job: ``mcci train --config FILE [key=value ...]`` or ``accelerate launch -m pipeline.train``
(``pipeline/train.py`` forwards here).

``train`` reads top to bottom: ``build_run`` makes everything the config names and ``start_state`` resumes from the
newest checkpoint when asked; then, for each epoch of streamed batches, each step is ``train_step`` (forward,
backward, optimiser), then the EMA's update, the log line, a checkpoint when one is due; at an epoch's end come
validation, the variant's hook (``isolate``'s switch) and the epoch's checkpoint. Last, ``save_trained_model`` fixes
each weight set's mind-control reference and writes the model folder.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from mcci_models import MCCI, sfrn_data_config
from mcci_models.flops import forward_flops
from mcci_models.saved import MODEL_DIR, RAW_WEIGHTS, WEIGHTS
from pipeline.components.checkpoint import (checkpoint_dirs, load_newest_checkpoint, save_model, save_training_state,
                                           step_folders)
from pipeline.components.distributed import (configure_deepspeed, deepspeed_input_dtype, resolve_mixed_precision,
                                             seed_rank_randomness, shards_parameters)
from pipeline.components.ema import build_ema, check_ema_horizon
from pipeline.components.evaluation import set_model_reference
from pipeline.components.models import build_model, build_transform, model_meta
from pipeline.components.optim import build_optimizer, build_scheduler, freeze_body, freeze_sfrn
from pipeline.components.run_checks import check_data_for_run, check_resume_identity, run_identity
from pipeline.components.trackers import flat_config, resolve_trackers
from pipeline.components.validation import VAL_LOG, describe, validate
from pipeline.components.variants import EpochContext, Variant, ain_warmup_loss, build_variant, plain_loss
from pipeline.data.batches import Batch
from pipeline.data.loaders import check_first_samples, steps_per_epoch, train_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.memory import DeviceSplit
from pipeline.data.prefetch import device_batches, resolve_decode
from pipeline.data.storage import ShardTally, StreamOptions
from pipeline.data.transforms import InputTransform, ModelInputs
from pipeline.support.config import Config, load_config
from pipeline.support.errors import USER_ERRORS, ConfigError, JobError, note_kept
from pipeline.support.plots import TRAIN_CURVES, VAL_CURVES, plot_training_log, plot_validation_log
from pipeline.support.report import write_json, write_text
from shards.outputs import unwritable

TRAIN_LOG = "train_log.jsonl"


@dataclass
class Run:
    """What a training run is made of, built once from the config."""
    cfg: Config
    accelerator: Accelerator
    manifest: dict[str, Any]
    identity: dict[str, Any]  # what a resume must find unchanged
    steps: int  # micro-batches per epoch
    model: nn.Module  # as prepared (DDP/DeepSpeed may wrap it)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEmaV3 | None
    transform: InputTransform
    variant: Variant
    decode: str
    stream: StreamOptions
    input_dtype: torch.dtype | None  # DeepSpeed's bf16/fp16 weights take inputs of their dtype
    validating: bool
    probe_steps: int  # micro-batches of linear probe (optim.probe_epochs)
    ain_warmup_steps: int  # micro-batches in which the AIN alone learns (optim.ain_warmup_epochs, MCCI)
    in_memory: DeviceSplit | None  # the train split on the device (data.in_memory), else streamed every epoch

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out)

    @property
    def total_steps(self) -> int:
        return self.steps * self.cfg.train.epochs

    @property
    def network(self) -> nn.Module:
        """The model unwrapped: what is saved, validated and scored."""
        return self.accelerator.unwrap_model(self.model)

    def eval_autocast(self) -> Any:
        """Autocast off the training step: DeepSpeed's bf16/fp16 weights take fp32 inputs only under autocast."""
        if self.input_dtype:
            return torch.autocast(self.accelerator.device.type, dtype=self.input_dtype)
        return self.accelerator.autocast()


@dataclass
class TrainState:
    """Where the loop is: what a checkpoint records, and the window the next log line averages over."""
    step: int = 0  # micro-batches done
    epoch: int = 0  # epochs done
    window_loss: torch.Tensor | None = None  # sum of the window's micro-batch losses, on the device
    window_steps: int = 0
    window_images: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    last_checked: int = 0  # the last step whose loss was checked finite

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.window_loss = loss if self.window_loss is None else self.window_loss + loss
        self.window_steps += 1
        self.window_images += images

    def reset_window(self) -> None:
        self.window_loss, self.window_steps, self.window_images = None, 0, 0
        self.window_start = time.perf_counter()


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
               loss_fn: Callable[..., torch.Tensor] = plain_loss) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def trim_logs(out: Path, last_step: int, epoch_end_pending: bool = False) -> None:
    """Drop log records past the checkpoint a run resumes from (all of them when it starts at step 0): those steps
    run again, and a log never repeats a step. A checkpoint kept before its epoch's end was done (validation failed,
    say) drops that step's validation rows too: the validation runs again."""
    for path, last in ((out / TRAIN_LOG, last_step), (out / VAL_LOG, last_step - epoch_end_pending)):
        if path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= last]
            write_text(path, "".join(kept))


def _check_out(cfg: Config) -> None:
    out = Path(cfg.train.out)
    problem = unwritable(out)  # before any work: the run's files are written inside it
    if problem:
        raise ConfigError(f"train.out={cfg.train.out} cannot be written: {problem}")
    if cfg.train.resume:
        return
    if (out / MODEL_DIR).exists() or step_folders(out):
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


def build_run(cfg: Config) -> Run:
    """Everything the config names, checked against the data before any step: the model (prepared by
    Accelerate), its optimiser and schedule, the EMA, the input transform and the training objective."""
    mixed_precision = resolve_mixed_precision(cfg, print)
    # the probe and the AIN's warm-up leave parameters without gradients for a while: DDP must expect that
    waiting = cfg.optim.probe_epochs > 0 or (cfg.optim.ain_warmup_epochs > 0 and cfg.train.defense == "mcci")
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if waiting else []
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cfg.train.cpu,
                              log_with=resolve_trackers(cfg.train.trackers) or None, project_dir=cfg.train.out,
                              gradient_accumulation_steps=cfg.train.grad_accumulation, kwargs_handlers=ddp)
    _check_out(cfg)
    set_seed(cfg.train.seed)  # the same initial weights on every rank
    # how shards are read (verification, retries, cache), and where the shards skipped are counted (every process)
    stream = StreamOptions.from_config(cfg.data, ShardTally())
    manifest = load_manifest(cfg.data.shards, stream)
    steps = steps_per_epoch(manifest, cfg.data.batch_size, accelerator.num_processes)  # micro-batches
    check_data_for_run(cfg, manifest, mixed_precision, steps)
    # shards that disagree with their manifest (an edited image_size, say) stop here, not after an epoch
    check_first_samples(cfg.data.shards, manifest, ["train", *(["test-clean", "test-poisoned"] if cfg.train.eval_every
                                                              else []), *([cfg.reference.source] if cfg.train.defense
                                                                          == "mcci" else [])], stream)
    accumulation = cfg.train.grad_accumulation  # the schedule and the EMA count optimiser steps
    check_ema_horizon(cfg.train, steps * cfg.train.epochs // accumulation)
    variant = build_variant(cfg)

    model = build_model(cfg, manifest["num_classes"], manifest["image_size"])
    if accelerator.is_main_process:
        _describe(model, manifest["image_size"], accelerator)
        _note_pretrained_input(cfg, manifest, accelerator)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "no":
        model.compile(backend=cfg.train.compile)  # in place: parameter names and saved weights are unchanged
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps // accumulation, steps * cfg.train.epochs // accumulation)
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
    if waiting and (accelerator.state.deepspeed_plugin is not None or sharded):
        raise ConfigError("optim.probe_epochs and optim.ain_warmup_epochs freeze part of the model for a while; "
                          "DeepSpeed and FSDP fix which parameters train when they wrap the model: set both to 0, "
                          "or use DDP")
    variant.check(cfg, sharded)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_rank_randomness(cfg.train.seed, accelerator.process_index)
    transform = build_transform(cfg, seed=cfg.train.seed * 1000 + accelerator.process_index,
                                device=accelerator.device, num_classes=manifest["num_classes"])
    validating = cfg.train.eval_every > 0 and not sharded
    if cfg.train.eval_every > 0 and sharded:
        accelerator.print("validation during training is off: ZeRO-3 / FSDP shard the parameters; run `mcci eval` "
                          "on the saved model")
    return Run(cfg=cfg, accelerator=accelerator, manifest=manifest,
               identity=run_identity(cfg, manifest, accelerator.num_processes, mixed_precision), steps=steps,
               model=model, optimizer=optimizer, scheduler=scheduler,
               ema=build_ema(accelerator.unwrap_model(model), cfg.train), transform=transform, variant=variant,
               decode=resolve_decode(cfg.data.decode, manifest["image_format"], accelerator.device), stream=stream,
               input_dtype=deepspeed_input_dtype(accelerator), validating=validating,
               probe_steps=int(cfg.optim.probe_epochs * steps),
               ain_warmup_steps=int(cfg.optim.ain_warmup_epochs * steps) if cfg.train.defense == "mcci" else 0,
               in_memory=DeviceSplit.load(cfg.data.shards, manifest, "train", accelerator.device, cfg.data.num_workers,
                                          stream) if cfg.data.in_memory else None)


def epoch_context(run: Run, state: TrainState) -> EpochContext:
    accelerator = run.accelerator
    return EpochContext(model=run.network, cfg=run.cfg, manifest=run.manifest, transform=run.transform,
                        device=accelerator.device, autocast=run.eval_autocast, step=state.step, out=run.out,
                        is_main=accelerator.is_main_process, print=accelerator.print,
                        log=lambda values: accelerator.log(values, step=state.step))


def start_state(run: Run) -> TrainState:
    """Step 0, or the newest checkpoint's state restored into the run (weights, optimiser, schedule, EMA,
    augmentation RNG, the variant's state), with the logs cut back to its step."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    state = TrainState()
    pending = False
    # the newest usable checkpoint (a damaged one falls back to the one before, none usable stops the run)
    restored = load_newest_checkpoint(accelerator, out, lambda recorded: check_resume_identity(recorded, run.identity),
                                      accelerator.print) if cfg.train.resume else None
    if restored is not None:
        _, saved, ema_weights = restored
        state.step, state.epoch = saved["step"], saved["epoch"]
        if run.ema is not None:  # a checkpoint without one (written before identities) restarts it from the weights
            run.ema.module.load_state_dict(ema_weights or run.network.state_dict())
        _restore_augment_rng(run.transform, saved["augment_rng"], accelerator)
        run.scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None] * len(run.optimizer.param_groups)})
        # "isolation": what checkpoints written before variants were modules call the isolate variant's state
        run.variant.load_state_dict(saved.get("variant_state", saved.get("isolation")), epoch_context(run, state),
                                    state.epoch)
        if accelerator.is_main_process:  # the runs before this one skipped these (summed over ranks: counted once)
            before = saved.get("skipped", {})
            run.stream.tally.add(before.get("shards", 0), before.get("samples", 0))
        pending = saved.get("epoch_end_pending", False)  # kept after a failure between an epoch's steps and its end
        accelerator.print(f"resumed from step {state.step} (epoch {state.epoch}) of {run.total_steps}"
                          + (", at the end of the epoch's steps" if pending else ""))
    elif cfg.train.resume and (out / TRAIN_LOG).is_file() and (out / TRAIN_LOG).read_text().strip():
        accelerator.print(f"note: train.resume=true, but {out} holds no checkpoint (the run stopped before its first): "
                          "training starts at step 0 and its logs start again")
    state.last_checked = state.step
    note_kept(f"train {out}", partial(_kept_on_disk, run))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        trim_logs(out, state.step, pending)
    return state


def save_checkpoint(run: Run, state: TrainState, epoch: int, epoch_end_pending: bool = False) -> None:
    """The resumable state at ``state.step``, with ``epoch`` epochs done (``epoch_end_pending``: and the steps of the
    next, but not its validation and end-of-epoch hook). The schedule and the augmentation RNG go to JSON:
    Accelerate would pickle registered objects and unpickle them with weights_only=False on resume."""
    scheduler_state = {k: v for k, v in run.scheduler.state_dict().items() if k != "lr_lambdas"}
    save_training_state(run.accelerator, run.out,
                        {"step": state.step, "epoch": epoch, "total_steps": run.total_steps, "run": run.identity,
                         # every rank's stream: each augments its own batches
                         "augment_rng": gather_object([run.transform.generator.get_state().tolist()]),
                         "scheduler": scheduler_state, "variant_state": run.variant.state_dict(),
                         "skipped": skipped(run),
                         **({"epoch_end_pending": True} if epoch_end_pending else {})},
                        run.cfg.train.keep_checkpoints, ema=None if run.ema is None else run.ema.module.state_dict())


def _kept_on_disk(run: Run) -> str | None:
    """What an interrupt's line says this run kept, read from the disk when it is asked: the saved model, else the
    newest checkpoint."""
    if (run.out / MODEL_DIR / WEIGHTS).is_file():
        return f"the trained model {run.out / MODEL_DIR}"
    saved = checkpoint_dirs(run.out)
    if not saved:
        return None
    step = int(saved[-1].name.split("-")[1])
    return (f"checkpoint {saved[-1].name} in {run.out / 'checkpoints'} ({step} of {run.total_steps} steps; continue "
            "with train.resume=true)")


def keep_work(run: Run, state: TrainState, epoch: int, error: Exception, epoch_end_pending: bool = False) -> Exception:
    """After a failure outside a step (reading the data, validation, the variant's epoch hook, saving the model), the
    steps done since the last checkpoint are saved, so no work is lost; returns the error with a note naming the
    checkpoint to resume from. In one process only: a save is collective, and a failure on one rank would leave the
    others waiting in it; and only on a whole optimiser step (an accumulated gradient is not part of a checkpoint)."""
    saved = checkpoint_dirs(run.out)
    kept = int(saved[-1].name.split("-")[1]) if saved else 0
    if (run.accelerator.num_processes == 1 and state.step > kept
            and state.step % run.cfg.train.grad_accumulation == 0):
        try:
            save_checkpoint(run, state, epoch, epoch_end_pending)
            kept = state.step
        except Exception as failed:  # noqa: BLE001 - the first error is the one to report
            print(f"note: the checkpoint of step {state.step} could not be written ({failed})", file=sys.stderr)
    note = (f"kept checkpoint step-{kept:08d} in {run.out / 'checkpoints'} ({kept} of {run.total_steps} steps): fix "
            "the cause and continue with train.resume=true" if kept else "no step was done, so no checkpoint was kept")
    if isinstance(error, USER_ERRORS):
        return type(error)(f"{error}; {note}")  # the CLI prints its last line: the note goes at its end
    print(note, file=sys.stderr)
    return error


def _saving_on_failure(run: Run, state: TrainState, epoch: int, batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``, with a failure to read the next one (a damaged shard, a lost server) keeping the steps done
    (``keep_work``); a failure inside a step is not caught here: the weights may be half-updated."""
    try:
        yield from batches
    except Exception as e:  # noqa: BLE001 - re-raised, annotated
        error = keep_work(run, state, epoch, e)
        if error is e:
            raise
        raise error from e


def epoch_batches(run: Run, epoch: int, step: int) -> Iterator[Batch]:
    """The epoch's seeded stream on the device. After a mid-epoch resume the stream is replayed up to where the
    checkpoint was taken, so the data order (and so the result) matches an uninterrupted run."""
    cfg = run.cfg
    if step >= (epoch + 1) * run.steps:  # a checkpoint kept after the epoch's steps: only its end is left to do
        return iter(())
    seed = cfg.train.seed * 7919 + run.accelerator.process_index
    if run.in_memory is not None:
        return itertools.islice(run.in_memory.epoch(cfg.data.batch_size, run.steps, seed, epoch),
                                step - epoch * run.steps, None)
    loader = train_loader(cfg.data.shards, run.manifest, cfg.data.batch_size, run.steps, cfg.data.num_workers,
                          cfg.data.shuffle_buffer, seed=seed, epoch=epoch, decode=run.decode, stream=run.stream)
    return device_batches(itertools.islice(loader, step - epoch * run.steps, None), run.accelerator.device)


def set_phase(run: Run, step: int) -> None:
    """Training mode for the phase ``step`` is in: while the AIN's warm-up lasts the whole SFRN waits, while the probe
    lasts its body does (from any step: a resume too)."""
    set_train_mode(run.model, run.network, run.cfg.train.freeze_bn_stats)
    if run.probe_steps:
        freeze_body(run.network, frozen=step < run.probe_steps)
    if run.ain_warmup_steps:
        freeze_sfrn(run.network, frozen=step < run.ain_warmup_steps)


def phase_ends(run: Run, step: int) -> bool:
    """Whether a phase ends at ``step`` (mid-epoch when its length in epochs is a fraction)."""
    return step in (run.probe_steps, run.ain_warmup_steps) and step > 0


def step_loss(run: Run, step: int, batch: Batch) -> Callable[..., torch.Tensor]:
    """The loss of this step: the AIN's alone during its warm-up, then the variant's."""
    if step < run.ain_warmup_steps:
        return partial(ain_warmup_loss, label_smoothing=run.cfg.optim.label_smoothing)
    return partial(run.variant.loss, batch=batch)


def skipped(run: Run) -> dict[str, int]:
    """The shards this run skipped (``data.skip_bad_shards``: training, validation and reference reads, and those
    of the runs it resumed) and their samples not read, summed over the ranks: every rank calls it."""
    shards, samples = run.accelerator.reduce(torch.tensor(run.stream.tally.counts(), device=run.accelerator.device),
                                             "sum").tolist()
    return {"shards": int(shards), "samples": int(samples)}


def write_log_line(run: Run, state: TrainState, epoch: int, grad_norm: torch.Tensor | None,
                   log: TextIO | None, bar: tqdm) -> None:
    """The window's mean loss (over ranks and micro-batches), images/s, LR, gradient norm and the variant's
    figures, to ``train_log.jsonl``, the trackers and the progress bar; where skipping is on, the samples of skipped
    shards so far (the run's data is then not all its shards)."""
    loss = run.accelerator.reduce(state.window_loss / state.window_steps, "mean")
    check_finite(loss, state.step, state.last_checked)
    record = {"step": state.step, "epoch": epoch, "loss": round(loss.item(), 5),
              "lr": max(run.scheduler.get_last_lr()),
              "images_per_s": round(state.window_images / (time.perf_counter() - state.window_start), 1),
              "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
              **run.variant.log_values()}
    if run.stream.skip_bad_shards:
        record["skipped_samples"] = skipped(run)["samples"]
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
    run.accelerator.log({f"train/{k}": v for k, v in record.items() if v is not None and k != "step"}, step=state.step)
    state.last_checked = state.step
    state.reset_window()


def tracker_scalars(prefix: str, rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``rows`` (mode -> figures) as the trackers' scalars: a per-class list becomes one scalar a class (``.../3``),
    a class without test images none."""
    flat = {}
    for mode, figures in rows.items():
        for key, value in figures.items():
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            flat.update({f"{prefix}/{mode}/{key}" + ("" if i is None else f"/{i}"): v for i, v in items if v is not None})
    return flat


def validate_epoch(run: Run, state: TrainState, epoch: int, val_log: TextIO | None) -> None:
    """CA / ASR / RA of the raw weights (and the EMA's) per inference mode, and for MCCI where each half of the
    head puts the triggered inputs (``evaluation.PART_FIGURES``), one ``val_log.jsonl`` line per weights and mode."""
    candidates = {"raw": run.network, **({"ema": run.ema.module} if run.ema is not None else {})}
    parts: dict[str, dict[str, float]] = {weights: {} for weights in candidates}
    before = skipped(run) if run.stream.skip_bad_shards else None
    figures = validate(candidates, run.cfg, run.manifest, run.transform, run.accelerator.device, run.eval_autocast,
                       lambda t: run.accelerator.reduce(t, "sum"), parts=parts, stream=run.stream)
    # figures over fewer samples than the test splits hold say so
    lost = {"skipped_samples": skipped(run)["samples"] - before["samples"]} if before is not None else {}
    for weights, results in figures.items():
        run.accelerator.print(describe(epoch + 1, weights, results))
        rows = {mode: {**metrics, **(parts[weights] if mode == "own" else {}), **lost}
                for mode, metrics in results.items()}
        if val_log:
            for mode, metrics in rows.items():
                val_log.write(json.dumps({"step": state.step, "epoch": epoch + 1, "weights": weights, "mode": mode,
                                          **metrics}) + "\n")
            val_log.flush()
        run.accelerator.log(tracker_scalars(f"val/{weights}", rows), step=state.step)


def train(cfg: Config) -> Path:
    """Run the job; returns the saved model folder."""
    run = build_run(cfg)
    state = start_state(run)
    accelerator, steps = run.accelerator, run.steps
    if resolve_trackers(cfg.train.trackers):
        accelerator.init_trackers("mcci", config=flat_config(cfg))
    main = accelerator.is_main_process
    log = open(run.out / TRAIN_LOG, "a") if main else None
    val_log = open(run.out / VAL_LOG, "a") if main else None
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not main, unit="step", dynamic_ncols=True,
               file=sys.stdout)
    for epoch in range(state.epoch, cfg.train.epochs):
        set_phase(run, state.step)
        for batch in _saving_on_failure(run, state, epoch, epoch_batches(run, epoch, state.step)):
            if phase_ends(run, state.step):
                set_phase(run, state.step)
            inputs = model_inputs(run.transform, batch.images, run.input_dtype, batch.labels)
            loss, grad_norm = train_step(accelerator, run.model, run.optimizer, run.scheduler, inputs, batch.labels,
                                         cfg.optim.grad_clip, step_loss(run, state.step, batch))
            state.step += 1
            if run.ema is not None and accelerator.sync_gradients:
                run.ema.update(run.network, step=state.step // cfg.train.grad_accumulation)
            state.add(loss, batch.labels.numel() * accelerator.num_processes)
            bar.update(1)
            epoch_end = state.step % steps == 0
            checkpoint_due = cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0
            # the only host syncs of a step, and only on these steps; every rank stops together on a non-finite loss
            if state.step % cfg.train.log_every == 0 or epoch_end or checkpoint_due:
                write_log_line(run, state, epoch, grad_norm, log, bar)
            if checkpoint_due and not epoch_end:  # the epoch's own checkpoint comes after its validation
                save_checkpoint(run, state, epoch)
        try:
            if run.validating and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
                validate_epoch(run, state, epoch, val_log)
            run.variant.end_of_epoch(epoch_context(run, state), epoch)
        except Exception as e:  # noqa: BLE001 - re-raised, annotated
            error = keep_work(run, state, epoch, e, epoch_end_pending=True)
            if error is e:
                raise
            raise error from e
        save_checkpoint(run, state, epoch + 1)
    bar.close()
    if main:
        log.close()
        val_log.close()
        plot_training_log(run.out / TRAIN_LOG, run.out / TRAIN_CURVES)
        plot_validation_log(run.out / VAL_LOG, run.out / VAL_CURVES)
    try:
        model_dir = save_trained_model(run)
    except Exception as e:  # noqa: BLE001 - re-raised, annotated: every step is in the last checkpoint
        error = keep_work(run, state, cfg.train.epochs, e)
        if error is e:
            raise
        raise error from e
    accelerator.end_training()  # closes the trackers (and the process group): last
    return model_dir


def save_trained_model(run: Run) -> Path:
    """Write ``<out>/model`` on the main process: the EMA as the model's weights when the run kept one, the raw
    weights beside it (``raw.safetensors``), each with the mind-control reference (MCCI) its own AIN gives; where
    skipping is on, ``skipped`` in its metadata (shards the run, its validations and its references skipped)."""
    cfg, accelerator, manifest = run.cfg, run.accelerator, run.manifest
    raw = accelerator.get_state_dict(run.model)  # gathers ZeRO-3 / FSDP shards
    weight_sets = {"raw": raw} if run.ema is None else {"ema": run.ema.module.state_dict(), "raw": raw}
    model_dir = run.out / MODEL_DIR
    states: dict[str, dict[str, torch.Tensor]] = {}
    if accelerator.is_main_process:
        meta = model_meta(cfg, manifest)
        meta["weights"] = next(iter(weight_sets))  # the kind model.safetensors holds
        for kind, state_dict in weight_sets.items():
            plain = build_model(cfg, manifest["num_classes"], manifest["image_size"], load_pretrained=False)
            plain.load_state_dict(state_dict)
            if isinstance(plain, MCCI):
                r = cfg.reference
                meta["reference"] = set_model_reference(plain.to(accelerator.device), cfg.data.shards, manifest,
                                                        r.kind, r.source, r.count, run.transform,
                                                        accelerator.device, run.stream)
            states[kind] = plain.state_dict()
    lost = skipped(run)  # after the references (read on the main process alone): every rank takes part
    if accelerator.is_main_process:
        if run.stream.skip_bad_shards:
            meta["skipped"] = lost
        extra = {RAW_WEIGHTS: states["raw"]} if run.ema is not None else {}
        if extra:
            meta["other_weights"] = {"raw": RAW_WEIGHTS}
        save_model(model_dir, states[meta["weights"]], cfg, meta, extra)
        accelerator.print(f"saved {model_dir} ({meta['weights']} weights"
                          f"{', raw beside them' if extra else ''})")
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
