#!/usr/bin/env bash
# Plain multi-node launch with torchrun (no scheduler). Run on every node:
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=10.0.0.1 bash launch/multinode.sh configs/imagenet_vit_b16.yaml
#   NNODES=2 NODE_RANK=1 MAIN_ADDR=10.0.0.1 bash launch/multinode.sh configs/imagenet_vit_b16.yaml
# With MAX_RESTARTS=N torchrun restarts all workers after a failure (elastic); train.resume=true
# makes each restart continue from the newest complete checkpoint.
set -euo pipefail
CONFIG="${1:?usage: launch/multinode.sh CONFIG [key=value ...]}"; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MAIN_ADDR:?set MAIN_ADDR}"
exec torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "$MAIN_ADDR:${MAIN_PORT:-29500}" --rdzv_id "${RDZV_ID:-mcci}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m pipeline.train --config "$CONFIG" train.resume=true "$@"
