"""Input-pipeline throughput: shards -> decoded, augmented, normalised batches with spectra on the device.

    python -m benchmarks.loader --shards DIR [--batch 128] [--workers 0 2 8] [--decode workers device]
        [--storage local http s3] [--read-only] [--steps 20] [--out FILE]

Each row: shards -> device-ready batches (augmented, normalised, with spectra), with decoding either
in the loader's CPU workers (PIL, ``workers``) or on the device (``device``: workers only read tars;
nvJPEG on a GPU, torchvision's decoder on the CPU), the next batch prepared on a side stream.

``--storage`` reads the same folder from disk, from ``python -m http.server`` on 127.0.0.1, or from
moto's S3 server on 127.0.0.1 (uploaded first; needs ``.[test]``), each server in its own process.
Loopback measures the software overhead of each path (HTTP client, S3 protocol, verification), not a
network's bandwidth or latency.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from benchmarks.common import sync, vit_transform, write_result
from pipeline.data.loaders import train_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.prefetch import device_batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int) -> None:
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"no server came up on 127.0.0.1:{port}")


@contextmanager
def served(shards: str, storage: str) -> Iterator[str]:
    """The location to read ``shards`` from for ``storage``, with its loopback server running."""
    if storage == "local":
        yield shards
        return
    port = _free_port()
    if storage == "http":
        command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", shards, str(port)]
    else:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port)
        if storage == "http":
            yield f"http://127.0.0.1:{port}"
            return
        import fsspec

        from shards.upload import upload_folder

        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        fsspec.filesystem("s3").mkdir("bench")
        upload_folder(Path(shards), "s3://bench/shards", overwrite=False)
        yield "s3://bench/shards"
    finally:
        server.terminate()
        server.wait()


def measure(shards: str, manifest: dict, batch: int, workers: int, decode: str, steps: int,
            device: torch.device, read_only: bool = False) -> float:
    """Images/s after three warm-up batches; ``read_only`` stops at the workers' output (encoded,
    verified samples: the storage path alone, as when the GPU decodes)."""
    transform = vit_transform(with_spectra=True, device=device)
    loader = train_loader(shards, manifest, batch, steps + 3, workers, 1000, seed=0, epoch=0,
                          decode="device" if read_only else decode)
    start, done = None, 0
    for b in (loader if read_only else device_batches(loader, device)):
        if not read_only:
            inputs = transform(b.images, train=True)
        done += 1
        if done == 3:  # after the workers' start-up
            sync(device)
            start = time.perf_counter()
    if not read_only:
        _ = inputs.spectra.sum().item()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--decode", nargs="+", default=["workers", "device"], choices=["workers", "device"])
    parser.add_argument("--storage", nargs="+", default=["local"], choices=["local", "http", "s3"])
    parser.add_argument("--read-only", action="store_true", help="stop at the workers' verified, encoded samples")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for storage in args.storage:
        with served(args.shards, storage) as location:
            manifest = load_manifest(location)
            rows += [{"storage": storage, "workers": w, "decode": d,
                      "images_per_s": round(measure(location, manifest, args.batch, w, d, args.steps, device,
                                                    args.read_only), 1)}
                     for d in (["none"] if args.read_only else args.decode) for w in args.workers]
    shard_bytes = sum(sh["size"] for sh in manifest["splits"]["train"]["shards"])
    write_result("loader", {"device": device.type, "image_size": manifest["image_size"], "read_only": args.read_only,
                            "bytes_per_image": round(shard_bytes / manifest["splits"]["train"]["count"]),
                            "image_format": manifest["image_format"], "batch": args.batch, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
