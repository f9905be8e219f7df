"""Training-step throughput and MFU: plain fine-tuning (SFRN alone) vs MCCI (SFRN + AIN + spectra).

    python -m benchmarks.train_step [--models vit_small_patch16_224 vit_base_patch16_224]
        [--batch 128] [--precision bf16] [--size 224] [--compile inductor] [--channels-last]
        [--shards DIR [--decode auto|workers|device]] [--out FILE]

Every step is the trainer's own (``pipeline.jobs.train.train_step`` with the trainer's optimiser,
schedule and Accelerate autocast). (a) synthetic uint8 images already on the device; (b) with --shards, the real shard-fed pipeline
(webdataset workers read, decode on the device or in the workers, the device augments and computes
spectra, the next batch prepared on a side stream: pipeline/data/prefetch.py). FLOPs are counted with
PyTorch's FlopCounterMode on one forward pass (2 per multiply-add); a training step is taken as 3x
the forward. MFU = achieved FLOP/s / peak dense bf16 FLOP/s of the GPU (--peak-tflops, default
989 for an H100 SXM).
"""
from __future__ import annotations

import argparse
import time

import torch

from accelerate import Accelerator

from benchmarks.common import sync, timed, vit_transform, write_result
from mcci_models import create_model
from mcci_models.flops import forward_flops
from pipeline.components.optim import build_optimizer, build_scheduler
from pipeline.data.spectra import spectrum
from pipeline.jobs.train import model_inputs, train_step
from pipeline.support.config import OptimConfig

# the trainer's defaults: AdamW, cosine schedule, gradient clipping at 5
RECIPE = OptimConfig()


def trainer_step(accelerator: Accelerator, model: torch.nn.Module, transform, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple:
    """The trainer's own optimiser, schedule and step function (pipeline.jobs.train.train_step), on the
    model after ``accelerator.prepare``; returns (prepared model, a step closure)."""
    optimizer = build_optimizer(model, RECIPE)
    scheduler = build_scheduler(optimizer, RECIPE, steps_per_epoch=1000, total_steps=10**6)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step() -> None:
        train_step(accelerator, model, optimizer, scheduler, model_inputs(transform, images, None), labels,
                   RECIPE.grad_clip)
    return model, step


def prepared(model: torch.nn.Module, args) -> torch.nn.Module:
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile != "no":
        model.compile(backend=args.compile)
    return model


def bench_model(name: str, args, accelerator: Accelerator) -> dict:
    size, device = args.size, accelerator.device
    out = {"model": name}
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    for defense in ("none", "mcci"):
        model = create_model(defense, name, 10, size).to(device).train()
        flops = 3 * (forward_flops(model.sfrn, (1, 3, size, size)) + forward_flops(model.ain, (1, 3, size, size))
                     if defense == "mcci" else forward_flops(model, (1, 3, size, size)))
        transform = vit_transform(with_spectra=defense == "mcci", device=device, channels_last=args.channels_last)
        model, step = trainer_step(accelerator, prepared(model, args), transform, images, labels)
        s = timed(step, device, warmup=5, repeat=args.repeat)
        ips = args.batch / s
        key = "plain" if defense == "none" else "mcci"
        out[f"{key}_images_per_s"] = round(ips, 1)
        out[f"{key}_train_gflops_per_image"] = round(flops / 1e9, 2)
        if device.type == "cuda":
            out[f"{key}_mfu"] = round(ips * flops / (args.peak_tflops * 1e12), 4)
            out[f"{key}_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        if defense == "mcci":
            pixels = images.float()
            spec_s = timed(lambda: spectrum(pixels, "log"), device, repeat=args.repeat)
            out["spectrum_ms_per_batch"] = round(spec_s * 1e3, 3)
            out["spectrum_share_of_mcci_step"] = round(spec_s / s, 4)
        del model, step
    out["mcci_slowdown_vs_plain"] = round(out["plain_images_per_s"] / out["mcci_images_per_s"] - 1, 4)
    if args.shards:
        out.update(shard_fed(name, args, accelerator))
    return out


def shard_fed(name: str, args, accelerator: Accelerator) -> dict:
    """MCCI steps fed by the real loader; images/s over a fixed number of steps after warm-up."""
    from pipeline.data.loaders import train_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.data.prefetch import device_batches, resolve_decode

    device = accelerator.device
    manifest = load_manifest(args.shards)
    model = prepared(create_model("mcci", name, manifest["num_classes"], manifest["image_size"]).to(device).train(), args)
    optimizer = build_optimizer(model, RECIPE)
    scheduler = build_scheduler(optimizer, RECIPE, steps_per_epoch=1000, total_steps=10**6)
    model, optimizer = accelerator.prepare(model, optimizer)
    transform = vit_transform(with_spectra=True, device=device, channels_last=args.channels_last)
    steps = args.shard_steps
    decode = resolve_decode(args.decode, manifest["image_format"], device)
    loader = train_loader(args.shards, manifest, args.batch, steps + 5, args.workers, 2000, 0, 0, decode=decode)
    done, start = 0, None
    for batch in device_batches(loader, device):
        train_step(accelerator, model, optimizer, scheduler, model_inputs(transform, batch.images, None), batch.labels,
                   RECIPE.grad_clip)
        done += 1
        if done == 5:
            sync(device)
            start = time.perf_counter()
    sync(device)
    return {"shard_fed_mcci_images_per_s": round(steps * args.batch / (time.perf_counter() - start), 1),
            "shard_fed_workers": args.workers, "shard_fed_decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--size", type=int, default=224, help="synthetic image side")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default="no", choices=["no", "inductor", "aot_eager", "eager"])
    parser.add_argument("--decode", default="auto", choices=["auto", "workers", "device"])
    parser.add_argument("--shards", help="shard folder (224 px) for the shard-fed measurement")
    parser.add_argument("--shard-steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    # the trainer's Accelerator: its autocast, no TF32 switched on that training would not have
    accelerator = Accelerator(mixed_precision=args.precision)
    device = accelerator.device
    rows = [bench_model(name, args, accelerator) for name in args.models]
    result = {"device": device.type, "batch": args.batch, "precision": args.precision, "size": args.size,
              "compile": args.compile, "channels_last": args.channels_last, "rows": rows}
    if device.type == "cuda":  # MFU is only computed against a GPU's peak
        result["peak_tflops"] = args.peak_tflops
    write_result("train_step", result, args.out)


if __name__ == "__main__":
    main()
