#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
#   ./scripts/test.sh [pytest args]
# The CPU build of torch is installed first and pinned, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,reference,dev]" "torch==2.13.0"
python -m pytest -q "$@"
