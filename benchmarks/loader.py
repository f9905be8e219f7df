"""Input-pipeline throughput: shards -> decoded, augmented, normalised batches with spectra on the device.

    python -m benchmarks.loader --shards DIR [--batch 128] [--workers 0 2 8] [--steps 20] [--out FILE]

Decoding runs in the loader's CPU workers (PIL through webdataset); augmentation and the DCT run on
the device. GPU JPEG decoding (issue 4) is not implemented yet, so only the CPU-decode path is timed.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import sync, vit_transform, write_result
from pipeline.stream import load_manifest, train_loader


def measure(shards: str, manifest: dict, batch: int, workers: int, steps: int, device: torch.device) -> float:
    transform = vit_transform(with_spectra=True)
    loader = train_loader(shards, manifest, batch, steps + 3, workers, 1000, seed=0, epoch=0)
    start, done = None, 0
    for b in loader:
        inputs = transform(b.to(device).images, train=True)
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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = load_manifest(args.shards)
    rows = [{"workers": w, "decode": "cpu", "images_per_s": round(measure(args.shards, manifest, args.batch, w,
                                                                            args.steps, device), 1)}
            for w in args.workers]
    write_result("loader", {"device": device.type, "image_size": manifest["image_size"],
                            "image_format": manifest["image_format"], "batch": args.batch, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
