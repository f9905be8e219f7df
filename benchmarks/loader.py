"""Input-pipeline throughput: shards -> decoded, augmented, normalised batches with spectra on the device.

    python -m benchmarks.loader --shards DIR [--batch 128] [--workers 0 2 8] [--decode workers device]
        [--steps 20] [--out FILE]

Each row: shards -> device-ready batches (augmented, normalised, with spectra), with decoding either
in the loader's CPU workers (PIL, ``workers``) or on the device (``device``: workers only read tars;
nvJPEG on a GPU, torchvision's decoder on the CPU), the next batch prepared on a side stream.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import sync, vit_transform, write_result
from pipeline.data.loaders import train_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prefetch import device_batches


def measure(shards: str, manifest: dict, batch: int, workers: int, decode: str, steps: int,
            device: torch.device) -> float:
    transform = vit_transform(with_spectra=True, device=device)
    loader = train_loader(shards, manifest, batch, steps + 3, workers, 1000, seed=0, epoch=0, decode=decode)
    start, done = None, 0
    for b in device_batches(loader, device):
        inputs = transform(b.images, train=True)
        done += 1
        if done == 3:  # after the workers' start-up
            sync(device)
            start = time.perf_counter()
    _ = inputs.spectra.sum().item()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--decode", nargs="+", default=["workers", "device"], choices=["workers", "device"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = load_manifest(args.shards)
    rows = [{"workers": w, "decode": d, "images_per_s": round(measure(args.shards, manifest, args.batch, w, d,
                                                                        args.steps, device), 1)}
            for d in args.decode for w in args.workers]
    write_result("loader", {"device": device.type, "image_size": manifest["image_size"],
                            "image_format": manifest["image_format"], "batch": args.batch, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
