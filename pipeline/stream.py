"""Shards -> batches, with webdataset.

Training streams resample shards (with replacement, seeded per epoch, rank and worker) and the
loader stops after a fixed number of batches, so every rank takes the same number of steps per
epoch whatever the shard count: no DDP hang when shards do not divide evenly.

Evaluation reads each shard of a split exactly once across ranks (shards are split by rank, then
by worker), so counts summed over ranks cover every sample once with no padding duplicates.

These loaders are deliberately not passed to ``accelerator.prepare``: each rank already reads its
own part of the data, whereas Accelerate's ``dispatch_batches`` (its default for iterable datasets)
would have rank 0 read and decode every batch and broadcast slices, a bottleneck at scale, and its
even-batches padding would duplicate evaluation samples.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.utils import make_seed, pytorch_worker_seed

MANIFEST = "manifest.json"
SUPPORTED_FORMAT = 1


class ShardError(ValueError):
    pass


@dataclass
class Batch:
    """A batch as it leaves the CPU: uint8 images [B, C, H, W] and per-sample fields."""

    images: torch.Tensor
    labels: torch.Tensor  # the training label (the target for poisoned training samples)
    orig_labels: torch.Tensor  # the true label
    poisoned: torch.Tensor  # bool
    indices: torch.Tensor  # the sample's index in the source dataset

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.images, self.labels, self.orig_labels, self.poisoned, self.indices)))

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in (self.images, self.labels, self.orig_labels, self.poisoned, self.indices)))


@dataclass
class EncodedBatch:
    """A batch whose images are still the shard's encoded bytes (``decode="device"``): the loader's
    workers only read tars, and ``pipeline.feed`` decodes on the device (nvJPEG on a GPU)."""

    encoded: list[torch.Tensor]  # one uint8 tensor of file bytes per sample
    image_format: str  # "jpg" or "png"
    labels: torch.Tensor
    orig_labels: torch.Tensor
    poisoned: torch.Tensor
    indices: torch.Tensor

    def pin_memory(self) -> "EncodedBatch":
        return EncodedBatch([t.pin_memory() for t in self.encoded], self.image_format,
                            *(t.pin_memory() for t in (self.labels, self.orig_labels, self.poisoned, self.indices)))


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def resolve_url(url: str) -> str:
    """Local paths and http(s) URLs open as they are (webdataset's gopen, curl for http); cloud
    object stores stream through their CLIs: s3:// with ``aws s3 cp``, gs:// with ``gsutil cat``."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {url} -"
    if url.startswith("gs://"):
        return f"pipe:gsutil cat {url}"
    return url


def load_manifest(location: str) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder or URL prefix (anything ``wds.gopen`` opens)."""
    url = _join(location, MANIFEST)
    try:
        with wds.gopen(resolve_url(url), "rb") as stream:
            manifest = json.load(io.TextIOWrapper(stream, encoding="utf-8"))
    except FileNotFoundError as e:
        raise ShardError(f"no {MANIFEST} at {location}; point data.shards at a folder made by `mcci shards build`") from e
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {url}: {e}; rebuild the shards with `mcci shards build`") from e
    if manifest.get("format_version") != SUPPORTED_FORMAT:
        raise ShardError(f"{url} has format_version {manifest.get('format_version')}, this mcci reads "
                         f"{SUPPORTED_FORMAT}; rebuild the shards with this version")
    return manifest


def shard_urls(location: str, manifest: dict[str, Any], split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} is not in {location}; it has {sorted(manifest['splits'])}")
    urls = [resolve_url(_join(location, s["path"])) for s in manifest["splits"][split]["shards"]]
    if not urls:
        raise ShardError(f"split {split!r} of {location} has no shards (0 samples)")
    return urls


class _DecodeError(Exception):
    pass


def _fields(sample: dict[str, Any], meta: dict[str, Any], num_classes: int) -> tuple:
    """(label, orig_label, poisoned, index), refusing labels the model has no output for."""
    for key in ("label", "orig_label"):
        if not 0 <= meta[key] < num_classes:
            raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has {key} {meta[key]}, "
                               f"outside the manifest's {num_classes} classes")
    return meta["label"], meta["orig_label"], meta["poisoned"], meta["index"]


def _to_sample(sample: dict[str, Any], num_classes: int) -> tuple:
    image = sample.get("png", sample.get("jpg"))
    if image is None or "json" not in sample:
        raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or its json")
    return image, *_fields(sample, sample["json"], num_classes)


def _to_encoded_sample(sample: dict[str, Any], num_classes: int) -> tuple:
    fmt = "png" if "png" in sample else "jpg"
    if fmt not in sample or "json" not in sample:
        raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or its json")
    data = torch.frombuffer(bytearray(sample[fmt]), dtype=torch.uint8)
    return (data, fmt), *_fields(sample, json.loads(sample["json"]), num_classes)


def collate(samples: list[tuple]) -> Batch | EncodedBatch:
    images, labels, orig, poisoned, index = zip(*samples)
    fields = (torch.tensor(labels), torch.tensor(orig), torch.tensor(poisoned, dtype=torch.bool), torch.tensor(index))
    if isinstance(images[0], tuple):  # encoded bytes, decoded later on the device
        return EncodedBatch([data for data, _ in images], images[0][1], *fields)
    return Batch(torch.stack(images), *fields)


class _SeededShuffle:
    """A shuffle buffer seeded from (seed, epoch, rank, worker), resolved inside the worker."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterator) -> Iterator:
        return _shuffle(src, self.bufsize, min(self.bufsize, 100), seed=make_seed(self.seed, self.epoch,
                                                                                 pytorch_worker_seed()))


def corrupt_shard(exn: Exception) -> bool:
    """webdataset error handler: stop with an error naming the shard and the fix (never skip
    samples silently). webdataset appends the shard's URL to the exception's args."""
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or "://" in a)), "a shard")
    raise ShardError(f"cannot read {where}: {exn.args[0] if exn.args else exn!r}; compare the file with its sha256 "
                     "in manifest.json and rebuild the shards (`mcci shards build`) if it differs") from exn


def _decoding_stages(handler, num_classes: int, decode: str = "workers") -> list:
    """Tar reading, then either decoding in the loader's workers (PIL) or passing encoded bytes on."""
    if decode == "device":
        return [wds.tarfile_to_samples(handler=handler)], [
            wds.map(partial(_to_encoded_sample, num_classes=num_classes), handler=handler)]
    return [wds.tarfile_to_samples(handler=handler)], [
        wds.decode("torchrgb8", handler=handler),
        wds.map(partial(_to_sample, num_classes=num_classes), handler=handler),
    ]


def train_loader(location: str, manifest: dict[str, Any], batch_size: int, steps: int, num_workers: int,
                 shuffle_buffer: int, seed: int, epoch: int, decode: str = "workers") -> wds.WebLoader:
    """An endless seeded resample of the train shards, cut to ``steps`` full batches per process.
    ``decode="device"`` yields ``EncodedBatch``es for ``pipeline.feed`` to decode."""
    urls = shard_urls(location, manifest, "train")
    read, decoding = _decoding_stages(corrupt_shard, manifest["num_classes"], decode)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=make_seed(seed, epoch), deterministic=True),
        *read,
        _SeededShuffle(shuffle_buffer, seed, epoch),
        *decoding,
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    workers = min(num_workers, len(urls)) if num_workers else 0
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, and a
    # resumed run, which creates the loader at another point, would get other dropout masks.
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False,
                           pin_memory=torch.cuda.is_available(),
                           generator=torch.Generator().manual_seed(make_seed(seed, epoch)))
    return loader.with_epoch(steps)


def eval_loader(location: str, manifest: dict[str, Any], split: str, batch_size: int,
                num_workers: int, limit: int | None = None, by_rank: bool = True, decode: str = "workers") -> wds.WebLoader:
    """Every sample of ``split`` once across all ranks, in shard order; ``limit`` stops early.

    ``by_rank=False`` gives every rank the whole split (for the reference, which must be the same
    on every rank).
    """
    urls = shard_urls(location, manifest, split)
    read, decoding = _decoding_stages(corrupt_shard, manifest["num_classes"], decode)
    stages = [wds.SimpleShardList(urls), *([wds.split_by_node] if by_rank else []), wds.split_by_worker, *read, *decoding]
    if limit is not None:
        stages.append(wds.slice(limit))
    stages.append(wds.batched(batch_size, collation_fn=collate, partial=True))
    workers = min(num_workers, len(urls)) if limit is None else 0
    return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers,
                         pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))


def steps_per_epoch(manifest: dict[str, Any], batch_size: int, world_size: int) -> int:
    count = manifest["splits"]["train"]["count"]
    steps = count // (batch_size * world_size)
    if steps == 0:
        raise ShardError(f"the train split has {count} samples, fewer than one batch of {batch_size} x "
                         f"{world_size} processes; lower data.batch_size")
    return steps
