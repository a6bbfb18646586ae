#!/usr/bin/env bash
# The GPU validation suite, for one run of under 8 minutes on the validation machine (an
# H200 with PyTorch CUDA, onnx, onnxruntime for the CPU, cuda-bindings and cupy; no
# TensorRT, no network) or any NVIDIA GPU. It installs nothing from the network: it uses
# the Python found there, plus any wheels carried in .whl/. The plan, the checks and the
# report are in scripts/gpu_suite.py and scripts/gpu_checks.py (docs/gpu-validation.md).
#
#   bash scripts/gpu_suite.sh              # run it; JSON lines in $OUT/gpu_suite.jsonl
#   bash scripts/gpu_suite.sh --dry-run    # print the plan and the report it would write
#
# One JSON line per check: ok true (validated), false (failed), null (not run or not
# validated; a skipped GPU test is never a pass). It rewrites the "Last run" section of
# docs/gpu-validation.md (a copy goes to $OUT, the one folder the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/dllm-gpu-suite}
RESULTS=${OUT:-$WORK}/gpu_suite.jsonl
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # this checkout, not an installed copy
export PYTHONUNBUFFERED=1
[ "$DRY" = 0 ] && rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$RESULTS")"
exec $PY scripts/gpu_checks.py suite --work "$WORK" --results "$RESULTS" "$@"
