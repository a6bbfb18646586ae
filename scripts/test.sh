#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
#   ./scripts/test.sh [pytest args]          # PYTEST_WORKERS=1 runs them in one process
# The suite runs on every core (pytest-xdist), a test module per worker so that its
# module-scoped exports are made once; each worker computes on one thread, and OpenMP
# threads wait passively (spinning workers on a shared CPU slowed steps 5-8x here).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="export,reference,eval,dev" . scripts/_venv.sh
WORKERS=${PYTEST_WORKERS:-auto}
if [ "$WORKERS" = 1 ]; then
    exec python -m pytest -q "$@"
fi
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
exec python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
