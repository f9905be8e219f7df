#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with mcci installed (editable).
#   bash launch/setup.sh         # the package
#   bash launch/setup.sh test    # plus the test extras
# torch 2.14.1 / torchvision 0.29.1 are pinned because the machines this project is built on
# serve those from a local cache; any torch >= 2.3 works.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "$extras" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
