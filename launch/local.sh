#!/usr/bin/env bash
# Local multi-process training: all GPUs of this machine, or N CPU processes (gloo) without one.
#   bash launch/local.sh configs/cifar10_resnet18.yaml [key=value ...]
#   NPROC=2 bash launch/local.sh configs/cifar10_resnet18.yaml train.cpu=true
set -euo pipefail
CONFIG="${1:?usage: launch/local.sh CONFIG [key=value ...]}"; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m pipeline.train --config "$CONFIG" "$@"
