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

import io
import json
import warnings
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.filters import _shuffle
from webdataset.utils import make_seed, pytorch_worker_seed

from pipeline.data.batches import collate
from pipeline.data.manifest import shard_records
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions, damaged, shard_samples
from pipeline.support.errors import ShardError


class _DecodeError(Exception):
    """A sample that does not fit its manifest; the message names the sample, its shard and the fix."""


def _fields(sample: dict[str, Any], meta: dict[str, Any], num_classes: int) -> tuple:
    """(label, orig_label, poisoned, index), refusing labels the model has no output for."""
    for key in ("label", "orig_label"):
        if not 0 <= meta[key] < num_classes:
            raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has {key} {meta[key]}, "
                               f"outside the manifest's {num_classes} classes; the shard or manifest.json was edited "
                               "or swapped: rebuild the shards (`mcci shards build`)")
    return meta["label"], meta["orig_label"], meta["poisoned"], meta["index"]


def _encoded(sample: dict[str, Any]) -> tuple[str, bytes, dict[str, Any]]:
    """(format, image bytes, metadata) of a sample as the tar holds it."""
    fmt = "png" if "png" in sample else "jpg"
    if fmt not in sample or "json" not in sample:
        raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or its json; "
                           "rebuild the shards (`mcci shards build`)")
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise damaged(sample.get("__url__", "a shard"), f"sample {sample.get('__key__')}'s json does not parse ({e})") from e
    return fmt, sample[fmt], meta


def _open_checked(sample: dict[str, Any], fmt: str, data: bytes, image_size: int) -> Image.Image:
    """The image opened lazily and checked from its header, before anything is decoded: within Pillow's pixel limit
    (as ``mcci predict`` and the shard builder apply it; a small PNG can declare 144 megapixels, 2 GB decoded) and of
    the manifest's size (an edited ``image_size`` would otherwise train a model of the wrong shape for an epoch)."""
    key, url = sample.get("__key__"), sample.get("__url__", "a shard")
    try:
        with warnings.catch_warnings():  # Pillow warns above its limit; the check below says it in the one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # above twice the limit Pillow refuses to open it at all
        raise _DecodeError(f"sample {key} in {url}: {e}; it was not decoded, and `mcci shards build` never writes one: "
                           "rebuild the shards") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises several types for data it cannot identify
        raise damaged(url, f"sample {key}'s {fmt} does not decode ({e!r})") from e
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise _DecodeError(f"sample {key} in {url} is a {width}x{height} pixel image, above the limit of {limit} "
                           "(PIL.Image.MAX_IMAGE_PIXELS, Pillow's decompression-bomb guard), so it was not decoded; "
                           "`mcci shards build` never writes one: rebuild the shards")
    if (width, height) != (image_size, image_size):
        raise _DecodeError(f"sample {key} in {url} is {width}x{height} px, but manifest.json says image_size "
                           f"{image_size}: the manifest was edited or the shard replaced; rebuild the shards "
                           "(`mcci shards build`)")
    return image


def _to_sample(sample: dict[str, Any], num_classes: int, image_size: int) -> tuple:
    """Decoded in the loader's worker: uint8 [3, H, W], after the header checks of ``_open_checked``."""
    fmt, data, meta = _encoded(sample)
    fields = _fields(sample, meta, num_classes)
    image = _open_checked(sample, fmt, data, image_size)
    try:
        pixels = np.asarray(image.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt body fails only here
        raise damaged(sample.get("__url__", "a shard"), f"sample {sample.get('__key__')}'s {fmt} does not decode "
                      f"({e!r})") from e
    if pixels.shape != (image_size, image_size, 3):  # what was decoded, not only what the header said
        raise _DecodeError(f"sample {sample.get('__key__')} in {sample.get('__url__')} decodes to {pixels.shape}, not "
                           f"{image_size}x{image_size} RGB as manifest.json says; rebuild the shards")
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), *fields


def _to_encoded_sample(sample: dict[str, Any], num_classes: int, image_size: int) -> tuple:
    """Left encoded for the device's decoder, after the same header checks."""
    fmt, data, meta = _encoded(sample)
    fields = _fields(sample, meta, num_classes)
    _open_checked(sample, fmt, data, image_size)
    return (torch.frombuffer(bytearray(data), dtype=torch.uint8), fmt), *fields


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
    if isinstance(exn, ShardError):  # already one line naming the shard
        raise exn
    if isinstance(exn, _DecodeError):
        raise ShardError(str(exn)) from exn
    if isinstance(exn, wds.autodecode.DecodingError):
        raise damaged(exn.url, f"sample {exn.key}'s {exn.k} does not decode ({exn.__cause__!r})") from exn
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and (".tar" in a or "://" in a)), "a shard")
    raise damaged(where, str(exn.args[0]) if exn.args else repr(exn)) from exn


def _decoding_stages(records: dict[str, dict[str, Any]], stream: StreamOptions, manifest: dict[str, Any],
                     decode: str = "workers") -> tuple[list, list]:
    """Verified tar reading (``pipeline.data.storage``), then either decoding in the loader's workers
    (PIL) or passing encoded bytes on; either way each image's header is checked against the manifest first."""
    read = [wds.pipelinefilter(shard_samples)(records, stream)]
    convert = _to_encoded_sample if decode == "device" else _to_sample
    return read, [wds.map(partial(convert, num_classes=manifest["num_classes"], image_size=manifest["image_size"]),
                          handler=corrupt_shard)]


def train_loader(location: str, manifest: dict[str, Any], batch_size: int, steps: int, num_workers: int,
                 shuffle_buffer: int, seed: int, epoch: int, decode: str = "workers",
                 stream: StreamOptions = DEFAULT_STREAM) -> wds.WebLoader:
    """An endless seeded resample of the train shards, cut to ``steps`` full batches per process.
    ``decode="device"`` yields ``EncodedBatch``es for ``pipeline.data.prefetch`` to decode."""
    records = shard_records(location, manifest, "train")
    urls = list(records)
    read, decoding = _decoding_stages(records, stream, manifest, decode)
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
    read, decoding = _decoding_stages(records, stream, manifest, decode)
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


def check_first_samples(location: str, manifest: dict[str, Any], splits: list[str],
                        stream: StreamOptions = DEFAULT_STREAM) -> None:
    """Read and decode the first sample of each of ``splits`` (each check of the loaders applies), so that shards
    that disagree with their manifest stop a job before its first step rather than after an epoch of work."""
    for split in dict.fromkeys(splits):
        if manifest["splits"].get(split, {}).get("count", 0):
            next(iter(eval_loader(location, manifest, split, 1, 0, limit=1, by_rank=False, stream=stream)), None)
