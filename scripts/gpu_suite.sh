#!/usr/bin/env bash
# The GPU validation suite for the TensorRT path, prepared for one run on a lent H100/H200
# (or any NVIDIA GPU with TensorRT). It installs nothing from the network: it uses the
# Python found there, plus wheels carried in .whl/ (tensorrt, cuda-python, polygraphy...).
# Each check prints one JSON line; all lines also go to $OUT/gpu_suite.jsonl (or $WORK).
#
#   bash scripts/gpu_suite.sh            # tiny checkpoints of every family
#   DEFAULT_MODEL_DIR=path bash scripts/gpu_suite.sh   # and the default model
#
# What it checks (docs/gpu-validation.md): the GPU tests in tests/test_build.py; for each
# family, make-tiny -> export (with the cached graphs) -> build (fp32 and fp16) -> decode head
# vs ONNX Runtime CPU on the same canvases -> generation end to end, and per cache mode ->
# step time against PyTorch on CUDA; and the
# ONNX Runtime TensorRT-provider path when that provider is present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/dllm-gpu-suite}
RESULTS=${OUT:-$WORK}/gpu_suite.jsonl
SEQ_LEN=${SEQ_LEN:-64}
rm -rf "$WORK" && mkdir -p "$WORK" "$(dirname "$RESULTS")" && : > "$RESULTS"

emit() { echo "$1" | tee -a "$RESULTS"; }
# run NAME CMD...: run a step, keep its log, report failure as a JSON line and go on
run() {
    local name=$1; shift
    local log="$WORK/$name.log"
    local started=$SECONDS
    if "$@" >"$log" 2>&1; then
        grep '^{"check"' "$log" | tee -a "$RESULTS"
        emit "{\"check\": \"$name\", \"ok\": true, \"seconds\": $((SECONDS - started))}"
        return 0
    fi
    grep '^{"check"' "$log" | tee -a "$RESULTS"
    local tail_text
    tail_text=$(tail -n 3 "$log" | tr '"\\\t' "'/ " | tr '\n' ' ')
    emit "{\"check\": \"$name\", \"ok\": false, \"seconds\": $((SECONDS - started)), \"log_tail\": \"$tail_text\"}"
    return 1
}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # this checkout, not an installed copy
export PYTHONUNBUFFERED=1
CLI="$PY -m dllm_export.cli"

$PY scripts/gpu_checks.py env | tee -a "$RESULTS"
if ! $PY -c "import tensorrt" 2>/dev/null; then
    emit '{"check": "suite", "ok": false, "reason": "import tensorrt failed: carry TensorRT wheels in .whl/ (tensorrt-cu13 and its -libs, or -cu12 to match the driver)"}'
fi
if PROFILE=$($PY scripts/gpu_checks.py profile "$WORK" 2>/dev/null); then
    emit "{\"check\": \"profile\", \"ok\": true, \"profile\": \"$PROFILE\"}"
else
    emit "$PROFILE"  # the failed check's own JSON line
    PROFILE=""
fi

run pytest_gpu $PY -m pytest -q -m gpu tests/test_build.py -p no:cacheprovider

models=()
for family in llada llada-moe dream llada2; do
    run "make_tiny_$family" $CLI make-tiny "$WORK/$family" --family "$family" && models+=("$family:$WORK/$family")
done
if [ -n "${DEFAULT_MODEL_DIR:-}" ]; then models+=("default:$DEFAULT_MODEL_DIR"); fi

for entry in "${models[@]}"; do
    name=${entry%%:*}; checkpoint=${entry#*:}
    artifact="$WORK/$name-onnx"
    run "export_$name" $CLI export "$checkpoint" -o "$artifact" --seq-len "$SEQ_LEN" \
        --cache --block-length 16 --window 32 --target tensorrt || continue
    [ -n "$PROFILE" ] || continue  # no GPU profile: nothing to build
    for precision in fp32 fp16; do
        engine="$WORK/$name-trt-$precision"
        run "build_${name}_$precision" $CLI build "$artifact" --profile "$PROFILE" -o "$engine" \
            --precision "$precision" || continue
        run "compare_${name}_$precision" $PY scripts/gpu_checks.py compare "$artifact" "$engine"
        run "generate_${name}_$precision" $PY scripts/gpu_checks.py generate "$artifact" "$engine"
        run "cached_${name}_$precision" $PY scripts/gpu_checks.py cached "$artifact" "$engine"
        run "time_${name}_$precision" $PY scripts/gpu_checks.py time "$checkpoint" "$engine" "$PROFILE"
    done
    if $PY -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        run "build_${name}_ort_trt" $CLI build "$artifact" --profile "$PROFILE" \
            -o "$WORK/$name-ort-trt" --via ort-trt --precision fp16
    else
        emit "{\"check\": \"build_${name}_ort_trt\", \"ok\": null, \"reason\": \"onnxruntime here has no TensorrtExecutionProvider\"}"
    fi
done

failed=$(grep -c '"ok": false' "$RESULTS" || true)
emit "{\"check\": \"summary\", \"ok\": $([ "$failed" = 0 ] && echo true || echo false), \"failed\": $failed, \"results\": \"$RESULTS\"}"
