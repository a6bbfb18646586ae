# Sourced by demo.sh and test.sh: create or reuse the virtual environment, activate it, and
# install the CPU build of torch first, pinned to the version CI tests (pyproject's `export`
# extra admits any torch>=2.6): the pin is repeated with the extras so that resolving them
# never replaces it with a newer (CUDA) build.
#   EXTRAS="export,dev" . scripts/_venv.sh
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$EXTRAS]" "torch==2.13.0"
