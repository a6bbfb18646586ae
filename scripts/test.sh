#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
#   ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="export,reference,eval,dev" . scripts/_venv.sh
python -m pytest -q "$@"
