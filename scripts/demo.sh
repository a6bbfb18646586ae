#!/usr/bin/env bash
# Set up a virtual environment (CPU torch, exporter, ONNX Runtime) and run the whole
# pipeline on the shipped default model:  ./scripts/demo.sh [dllm-export demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="export,plots" . scripts/_venv.sh
exec dllm-export demo "$@"
