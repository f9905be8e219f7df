"""The bar a fine-tune must clear: a pre-trained ImageNet classifier, not trained on the shards at all,
scored on their test-clean split with its argmax restricted to the shards' classes.

    python -m benchmarks.untrained_accuracy --shards imagenette/pretrained/badnets/shards \\
        --weights weights/tf_efficientnet_lite0.safetensors --imagenet-indices 0 217 482 491 497 566 569 571 574 701

``--split test-poisoned`` scores the triggered images against their true labels: how well a clean model
reads them, the ceiling of a defence's RA. ``--imagenet-indices``: each shard class's index among the
1,000 ImageNet classes, in label order (Imagenette's, from its README, above). Writes ``--out`` (JSON)
and prints the accuracy.
"""
from __future__ import annotations

import argparse

import timm
import torch
from safetensors.torch import load_file

from benchmarks.common import write_result
from mcci_models import sfrn_data_config
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.transforms import InputTransform
from pipeline.support.config import AugmentConfig


@torch.no_grad()
def untrained_accuracy(shards: str, model_name: str, weights: str, imagenet_indices: list[int],
                       split: str = "test-clean", batch_size: int = 128) -> dict[str, float]:
    """Accuracy against each image's true label (on test-poisoned: how well a clean model reads
    triggered images, the ceiling of a defence's recovery accuracy)."""
    manifest = load_manifest(shards)
    if len(imagenet_indices) != manifest["num_classes"]:
        raise SystemExit(f"--imagenet-indices names {len(imagenet_indices)} classes, the shards have "
                         f"{manifest['num_classes']}")
    model = timm.create_model(model_name, num_classes=1000)
    model.load_state_dict(load_file(weights))  # strict: the 1,000-class head must be there too
    model.eval()
    data = sfrn_data_config(model_name)
    transform = InputTransform(data["mean"], data["std"], AugmentConfig(), "log", "torch", with_spectra=False)
    columns = torch.tensor(imagenet_indices)
    correct = total = 0
    for batch in eval_loader(shards, manifest, split, batch_size, num_workers=1):
        logits = model(transform(batch.images, train=False).images)
        correct += int((logits[:, columns].argmax(1) == batch.orig_labels).sum())
        total += batch.labels.numel()
    return {"accuracy": correct / total, "split": split, "images": total, "image_size": manifest["image_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", required=True, help="a safetensors file with the 1,000-class head")
    parser.add_argument("--imagenet-indices", type=int, nargs="+", required=True)
    parser.add_argument("--split", default="test-clean", choices=("test-clean", "test-poisoned"),
                        help="test-poisoned: the triggered images against their true labels")
    parser.add_argument("--out", default="untrained_accuracy.json")
    args = parser.parse_args()
    result = untrained_accuracy(args.shards, args.model, args.weights, args.imagenet_indices, args.split)
    print(f"{args.model}, untrained, argmax over the shards' {len(args.imagenet_indices)} classes: accuracy "
          f"{result['accuracy']:.3f} on {result['images']} {args.split} images at {result['image_size']} px")
    write_result("untrained_accuracy", {**vars(args), **result}, args.out)


if __name__ == "__main__":
    main()
