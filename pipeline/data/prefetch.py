"""Batches onto the device, decoded there if they arrive encoded, one batch ahead on a side stream.

On a GPU the copy of batch n+1 (from pinned memory, non-blocking) and its nvJPEG decode run on a
side CUDA stream while batch n computes; the compute stream waits for that stream only when it takes
the batch. On the CPU the same steps run in order, with the same decoder (torchvision's libjpeg or
libpng), so both paths give a ``Batch`` of uint8 [B, C, H, W] images on the device.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import torch
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from pipeline.data.batches import Batch, EncodedBatch
from pipeline.support.errors import ShardError

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the
# batched nvJPEG path that torch wheels ship with, so the warning is silenced here, once.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def resolve_decode(decode: str, image_format: str, device: torch.device) -> str:
    """``auto`` -> ``device`` for JPEG shards on a GPU, else ``workers``."""
    if decode != "auto":
        return decode
    return "device" if device.type == "cuda" and image_format == "jpeg" else "workers"


def decode_batch(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] on ``device``: JPEG decoded there (in one batched call), PNG on the CPU."""
    try:
        if batch.image_format == "jpg":
            images = decode_jpeg(batch.encoded, mode=ImageReadMode.RGB, device=device)
        else:
            images = [decode_png(data, mode=ImageReadMode.RGB) for data in batch.encoded]
    except RuntimeError as e:
        raise ShardError(f"cannot decode an image of samples {batch.indices.tolist()[:8]}...: {e}; check the shards' "
                         "sha256 against manifest.json and rebuild them (`mcci shards build`)") from e
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:  # the loader checked each header against the manifest; this is what was decoded
        raise ShardError(f"the images of samples {batch.indices.tolist()[:8]}... decode to different sizes {shapes}; "
                         "check the shards' sha256 against manifest.json and rebuild them (`mcci shards build`)")
    return torch.stack(images).to(device, non_blocking=True)


def to_device(batch: Batch | EncodedBatch, device: torch.device) -> Batch:
    if isinstance(batch, EncodedBatch):
        return Batch(decode_batch(batch, device), *(t.to(device, non_blocking=True) for t in batch.fields()))
    return batch.to(device)


def device_batches(batches: Iterable[Batch | EncodedBatch], device: torch.device) -> Iterator[Batch]:
    """Yield each batch on ``device``; on CUDA, the next one is copied and decoded while this one computes."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    side = torch.cuda.Stream(device)
    source = iter(batches)

    def issue() -> Batch | None:
        batch = next(source, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return to_device(batch, device)

    ready = issue()
    while ready is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)
        for t in ready.tensors():
            t.record_stream(compute)  # the allocator must not reuse this memory before compute is done with it
        current, ready = ready, issue()
        yield current
