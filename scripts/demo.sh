#!/usr/bin/env bash
# Set up a virtual environment (CPU torch, exporter, ONNX Runtime) and run the whole
# pipeline on the shipped default model:  ./scripts/demo.sh [dllm-export demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,plots]" "torch==2.13.0"
exec dllm-export demo "$@"
