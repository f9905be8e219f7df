#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with mcci installed (editable).
#   bash launch/setup.sh         # the package
#   bash launch/setup.sh test    # plus the test extras
# torch 2.14.1 / torchvision 0.29.1 are pinned because the machines this project is built on
# serve those from a local cache; any torch >= 2.3 works.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# torch's wheel with its CUDA libraries fills about 6.5 GB of the venv; pip dies half-way with
# "No space left on device" on a fuller disk, so say so before starting.
need_gb=8
free_gb=$(df --output=avail -B1G . 2>/dev/null | tail -1 | tr -d ' ' || true)  # GNU df; elsewhere unchecked
if [ ! -x .venv/bin/python ] && [[ "$free_gb" =~ ^[0-9]+$ ]] && [ "$free_gb" -lt "$need_gb" ]; then
  echo "launch/setup.sh: ${free_gb} GB free here; the venv needs about ${need_gb} GB (torch with its CUDA libraries)." >&2
  echo "Free some space (old virtual environments, pip's cache: pip cache purge) and run it again." >&2
  exit 1
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "$extras" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
