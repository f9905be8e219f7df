"""Shard URLs -> batches, with webdataset.

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

import json
from functools import partial
from typing import Any, Iterator

import torch
import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.utils import make_seed, pytorch_worker_seed

from pipeline.data.batches import collate
from pipeline.data.manifest import shard_records
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions, damaged, shard_samples
from pipeline.support.errors import ShardError


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


class _SeededShuffle:
    """A shuffle buffer seeded from (seed, epoch, rank, worker), resolved inside the worker."""

    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterator) -> Iterator:
        return _shuffle(src, self.bufsize, min(self.bufsize, 100), seed=make_seed(self.seed, self.epoch,
                                                                                 pytorch_worker_seed()))


def corrupt_shard(exn: Exception) -> bool:
    """webdataset error handler for decoding: stop with an error naming the shard and the fix (never
    skip samples silently). webdataset appends the shard's URL to the exception's args, or, for an
    undecodable file, keeps it on the DecodingError with the cause."""
    if isinstance(exn, wds.autodecode.DecodingError):
        raise damaged(exn.url, f"sample {exn.key}'s {exn.k} does not decode ({exn.__cause__!r})") from exn
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or "://" in a)), "a shard")
    raise damaged(where, str(exn.args[0]) if exn.args else repr(exn)) from exn


def _decoding_stages(records: dict[str, dict[str, Any]], stream: StreamOptions, num_classes: int,
                     decode: str = "workers") -> tuple[list, list]:
    """Verified tar reading (``pipeline.data.storage``), then either decoding in the loader's workers
    (PIL) or passing encoded bytes on."""
    read = [wds.pipelinefilter(shard_samples)(records, stream)]
    if decode == "device":
        return read, [wds.map(partial(_to_encoded_sample, num_classes=num_classes), handler=corrupt_shard)]
    return read, [
        wds.decode("torchrgb8", handler=corrupt_shard),
        wds.map(partial(_to_sample, num_classes=num_classes), handler=corrupt_shard),
    ]


def train_loader(location: str, manifest: dict[str, Any], batch_size: int, steps: int, num_workers: int,
                 shuffle_buffer: int, seed: int, epoch: int, decode: str = "workers",
                 stream: StreamOptions = DEFAULT_STREAM) -> wds.WebLoader:
    """An endless seeded resample of the train shards, cut to ``steps`` full batches per process.
    ``decode="device"`` yields ``EncodedBatch``es for ``pipeline.data.prefetch`` to decode."""
    records = shard_records(location, manifest, "train")
    urls = list(records)
    read, decoding = _decoding_stages(records, stream, manifest["num_classes"], decode)
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
                num_workers: int, limit: int | None = None, by_rank: bool = True, decode: str = "workers",
                stream: StreamOptions = DEFAULT_STREAM) -> wds.WebLoader:
    """Every sample of ``split`` once across all ranks, in shard order; ``limit`` stops early.

    ``by_rank=False`` gives every rank the whole split (for the reference, which must be the same
    on every rank).
    """
    records = shard_records(location, manifest, split)
    urls = list(records)
    read, decoding = _decoding_stages(records, stream, manifest["num_classes"], decode)
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
