"""The train split decoded once and kept on the device (``data.in_memory=true``).

For data that fits (CIFAR-10's 50,000 training images at 32 px are 154 MB as uint8), streaming shards through
loader workers every epoch costs more than the step: the workers restart, each image is decoded again, and a small
model waits on them. Here the split is read once through the same verified loader as evaluation (every shard's
hash, every sample's label and size checked), stacked on the device, and each epoch is a seeded permutation of it
cut into full batches. Augmentation stays where it is for streamed data (``InputTransform``, on the device), so a
run differs from a streamed one only in its sample order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import psutil
import torch
from webdataset.utils import make_seed

from pipeline.data.batches import Batch
from pipeline.data.loaders import eval_loader
from pipeline.data.storage import StreamOptions
from pipeline.support.errors import ConfigError

READ_BATCH = 1024  # samples per batch while the split is read; the stacked split is what stays
MEMORY_SHARE = 0.5  # of the free memory the split may take, leaving the rest to the model and its activations


def free_bytes(device: torch.device) -> int:
    """Free memory where the split will live: the GPU's (CUDA) or the host's available memory (psutil, which
    Accelerate requires: any OS, and the page cache the kernel would give back counts as free)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(count: int, image_size: int, device: torch.device, free: int | None = None) -> int:
    """The split's size in bytes, refused (before anything is read) when it exceeds ``MEMORY_SHARE`` of the free
    memory on ``device``."""
    needed = count * 3 * image_size * image_size
    free = free_bytes(device) if free is None else free
    if needed > MEMORY_SHARE * free:
        raise ConfigError(f"data.in_memory: the train split is {needed / 2**30:.2f} GiB decoded ({count:,} images at "
                          f"{image_size} px), more than {MEMORY_SHARE:.0%} of the {free / 2**30:.2f} GiB free on "
                          f"{device}; set data.in_memory=false to stream it from the shards")
    return needed


@dataclass
class DeviceSplit:
    """One split's samples as one ``Batch`` on the device."""
    samples: Batch

    @property
    def count(self) -> int:
        return len(self.samples.labels)

    @classmethod
    def load(cls, location: str, manifest: dict[str, Any], split: str, device: torch.device, num_workers: int,
             stream: StreamOptions) -> "DeviceSplit":
        """Every sample of ``split`` (each process reads the whole split), in shard order."""
        check_fits(manifest["splits"][split]["count"], manifest["image_size"], device)
        batches = eval_loader(location, manifest, split, READ_BATCH, num_workers, by_rank=False, decode="workers",
                              stream=stream)
        return cls(Batch.concatenate(list(batches)).to(device, non_blocking=False))

    def epoch(self, batch_size: int, steps: int, seed: int, epoch: int) -> Iterator[Batch]:
        """``steps`` full batches of a permutation seeded by (seed, epoch); where they need more samples than the
        split holds, further permutations follow, so each sample is seen once before any is seen twice."""
        generator = torch.Generator().manual_seed(make_seed(seed, epoch))
        needed = batch_size * steps
        order = torch.cat([torch.randperm(self.count, generator=generator)
                           for _ in range(math.ceil(needed / self.count))])[:needed]
        order = order.to(self.samples.labels.device)
        for step in range(steps):
            chosen = order[step * batch_size:(step + 1) * batch_size]
            yield Batch(*(t.index_select(0, chosen) for t in self.samples.tensors()))
