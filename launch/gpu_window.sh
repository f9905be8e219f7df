#!/usr/bin/env bash
# One short GPU window (issue 28), on the device machine: the carried wheels installed, a campaign plan run until
# the deadline (cells finished in earlier windows skipped), and its summary and archive left in $OUT, two files.
#   bash launch/gpu_window.sh PLAN DEADLINE_S [benchmarks.campaign options and overrides ...]
# Prepared here by launch/prepare_gpu_window.sh; the call carries .gpu-window and weights. Unpack the returned
# results.tar.gz's cells/ into .gpu-window/cells before the next window, and it goes on where this one stopped.
set -euo pipefail
PLAN="${1:?usage: launch/gpu_window.sh PLAN DEADLINE_S [campaign options ...]}"; DEADLINE="${2:?deadline in seconds}"
shift 2
WINDOW="${WINDOW:-.gpu-window}"; RUNS="${RUNS:-runs/window}"; OUT="${OUT:?set OUT, the folder whose files come back}"
PYTHON="${PYTHON:-python3}"
if compgen -G "$WINDOW/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WINDOW"/wheels/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$RUNS/cells"
if compgen -G "$WINDOW/cells/*.json" >/dev/null; then cp -n "$WINDOW"/cells/*.json "$RUNS/cells/"; fi
status=0
PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.campaign "$PLAN" --out "$RUNS" --data-root "$WINDOW/data" \
    --deadline-s "$DEADLINE" "$@" || status=$?
for name in campaign.json results.tar.gz; do
  if [ -f "$RUNS/$name" ]; then cp "$RUNS/$name" "$OUT/"; fi
done
exit $status
