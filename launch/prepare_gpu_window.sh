#!/usr/bin/env bash
# Before a short GPU window (issue 28), here: what the window's machine lacks, in one ignored folder that the device
# call carries, within its 64 MiB with the checkout. The wheels the H200 image lacks (webdataset, braceexpand), a
# class-balanced Imagenette subset (train/ and val/, benchmarks/class_subset.py) and the pretrained weights.
#   bash launch/prepare_gpu_window.sh IMAGENETTE_DIR [TRAIN_PER_CLASS] [VAL_PER_CLASS]
# IMAGENETTE_DIR holds train/ and val/ class folders (the tars of ../shared/data/imagenette, extracted). Then:
#   device run, carry [.gpu-window, weights]:
#   bash launch/gpu_window.sh configs/campaigns/imagenette224.yaml 480 --parallel 4
set -euo pipefail
SOURCE="${1:?usage: launch/prepare_gpu_window.sh IMAGENETTE_DIR [TRAIN_PER_CLASS] [VAL_PER_CLASS]}"
TRAIN_PER_CLASS="${2:-200}"; VAL_PER_CLASS="${3:-100}"
WINDOW="${WINDOW:-.gpu-window}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$WINDOW/wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WINDOW/wheels" webdataset braceexpand
for split in train val; do
  per_class=$TRAIN_PER_CLASS; seed=0
  if [ "$split" = val ]; then per_class=$VAL_PER_CLASS; seed=1; fi
  [ -d "$WINDOW/data/$split" ] || "$PYTHON" -m benchmarks.class_subset "$SOURCE/$split" "$WINDOW/data/$split" \
      --per-class "$per_class" --seed "$seed"
done
[ -f weights/tf_efficientnet_lite0.safetensors ] || "$PYTHON" -m pipeline.cli weights import \
    --out weights/tf_efficientnet_lite0.safetensors
mkdir -p "$WINDOW/cells"  # finished cells of earlier windows go here (unpacked from their results.tar.gz)
echo "prepared $WINDOW ($(du -sh "$WINDOW" | cut -f1)) and weights/; the checkout, $WINDOW and weights/ travel" \
     "together within 64 MiB"
