"""The batch types that leave the loader, and how samples are collated into them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A batch as it leaves the CPU: uint8 images [B, C, H, W] and per-sample fields."""

    images: torch.Tensor
    labels: torch.Tensor  # the training label (the target for poisoned training samples)
    orig_labels: torch.Tensor  # the true label
    poisoned: torch.Tensor  # bool
    indices: torch.Tensor  # the sample's index in the source dataset

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in self.tensors()))

    @staticmethod
    def concatenate(batches: list["Batch"]) -> "Batch":
        return Batch(*(torch.cat(parts) for parts in zip(*(b.tensors() for b in batches))))


@dataclass
class EncodedBatch:
    """A batch whose images are still the shard's encoded bytes (``decode="device"``): the loader's
    workers only read tars, and ``pipeline.data.prefetch`` decodes on the device (nvJPEG on a GPU)."""

    encoded: list[torch.Tensor]  # one uint8 tensor of file bytes per sample
    image_format: str  # "jpg" or "png"
    labels: torch.Tensor
    orig_labels: torch.Tensor
    poisoned: torch.Tensor
    indices: torch.Tensor

    def fields(self) -> tuple[torch.Tensor, ...]:
        """The per-sample fields, in ``Batch``'s order after its images."""
        return self.labels, self.orig_labels, self.poisoned, self.indices

    def pin_memory(self) -> "EncodedBatch":
        return EncodedBatch([t.pin_memory() for t in self.encoded], self.image_format,
                            *(t.pin_memory() for t in self.fields()))


def collate(samples: list[tuple]) -> Batch | EncodedBatch:
    images, labels, orig, poisoned, index = zip(*samples)
    fields = (torch.tensor(labels), torch.tensor(orig), torch.tensor(poisoned, dtype=torch.bool), torch.tensor(index))
    if isinstance(images[0], tuple):  # encoded bytes, decoded later on the device
        return EncodedBatch([data for data, _ in images], images[0][1], *fields)
    return Batch(torch.stack(images), *fields)
