#!/usr/bin/env bash
# Multi-node MCCI training under SLURM: one task per node, each running `accelerate launch` for
# its node's GPUs. Submit with, e.g.:
#   sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sh configs/imagenet_vit_b16.yaml train.epochs=10
#SBATCH --job-name=mcci
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch launch/slurm.sh CONFIG [key=value ...]}"; shift
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
# sed reads every line: `head -n 1` would close the pipe early, and under pipefail scontrol's SIGPIPE
# (exit 141) would end the job on large node lists
MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
MAIN_PORT="${MAIN_PORT:-29500}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp_multinode.yaml}"
mkdir -p logs
# Quoted once here so that overrides with spaces or brackets reach pipeline.train intact.
OVERRIDES=""
if [ $# -gt 0 ]; then OVERRIDES="$(printf ' %q' "$@")"; fi
# --kill-on-bad-exit: when one node's process dies, SLURM ends the others instead of leaving them
# blocked in a collective until the NCCL timeout.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port $MAIN_PORT \
  --max_restarts ${MAX_RESTARTS:-0} \
  -m pipeline.train --config $(printf %q "$CONFIG") train.resume=true$OVERRIDES"
