#!/usr/bin/env bash
# The one-command GPU training job (README "Training on a GPU"; scripts/gpu_job.py says what it does).
#   here:             scripts/gpu_train.sh prepare        # .gpu/: real volumes on the 2 mm grid + SimpleITK, size check
#   on the GPU host:  bash scripts/gpu_train.sh run [gpu_job.py options]      (carry .gpu; results land in $OUT)
#   ablations:        bash scripts/gpu_train.sh run --variants dtn_s dtn_c none --minutes 2.5 --init none
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    shift
    PY=${PYTHON:-.venv/bin/python}
    "$PY" scripts/make_gpu_bundle.py "$@"
    ;;
  run)
    shift
    OUT=${OUT:-gpu-out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    # SimpleITK is unpacked in the background while training runs; only the end-to-end timing needs it.
    if [ -f .gpu/sitk.tar.xz ]; then
      mkdir -p /tmp/dtn-site
      (tar xJf .gpu/sitk.tar.xz -C /tmp/dtn-site && touch /tmp/dtn-site/.ready) &
      export PYTHONPATH="/tmp/dtn-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    python3 scripts/gpu_job.py --bundle .gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/job.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: $0 prepare [--devdata DIR] | run [gpu_job.py options]" >&2
    exit 2
    ;;
esac
