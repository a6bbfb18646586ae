"""NVIDIA ModelOpt's ONNX PTQ, run in a separate environment the project manages.

``nvidia-modelopt[onnx]`` pins onnx ~1.21 and pulls ``onnxruntime-gpu`` (which provides the
same ``onnxruntime`` module as the CPU package and replaces it) and ``cupy`` (~1.1 GB in
all). Installed next to dllm-export it would downgrade onnx and swap onnxruntime under the
exporter and the runtime. So it never enters this environment: it lives in its own venv,

    $DLLM_EXPORT_MODELOPT_PYTHON               (any Python with modelopt[onnx]), or
    ~/.cache/dllm-export/modelopt/bin/python    (made by ``--install-modelopt``),

and ``modelopt_worker.py`` runs there in a subprocess, reading the graph and calibration
states from files. Without it, a ModelOpt method is refused with one line saying how to get
it; nothing else in the project needs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import venv
from pathlib import Path

import numpy as np

from dllm_export.calibration.states import CanvasState, batched
from dllm_export.errors import DllmExportError

ENV_VAR = "DLLM_EXPORT_MODELOPT_PYTHON"
MODELOPT_REQUIREMENT = "nvidia-modelopt[onnx]==0.47.0"
TORCH_PIN = "torch==2.13.0"  # modelopt needs torch>=2.8; never let it pull a newer one
WORKER = Path(__file__).with_name("modelopt_worker.py")
MODES = ("int8", "fp8", "int4")


def env_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dllm-export" / "modelopt"


def modelopt_python() -> Path:
    """The Python that runs ModelOpt (it may not exist yet)."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else env_dir() / "bin" / "python"


def unavailable_reason() -> str | None:
    """None when ModelOpt can run, else one line saying why and how to get it."""
    python = modelopt_python()
    if not python.is_file():
        return (
            f"ModelOpt is not installed (no {python}); rerun with --install-modelopt to "
            f"create its own environment there (~2 GB: {MODELOPT_REQUIREMENT}, kept apart "
            f"because it replaces onnxruntime and pins onnx 1.21), or set {ENV_VAR}"
        )
    probe = subprocess.run(
        [str(python), "-c", "import modelopt.onnx.quantization"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"{python} cannot import modelopt.onnx.quantization ({last})"
    return None


def install_env(report=None) -> Path:
    """Create ``env_dir()`` with ModelOpt (pip, from the configured package index)."""
    report = report or (lambda stage, detail="": None)
    target = env_dir()
    report("modelopt", f"creating {target}")
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    for step in ([TORCH_PIN], [MODELOPT_REQUIREMENT, TORCH_PIN]):
        report("modelopt", f"pip install {' '.join(step)}")
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *step],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DllmExportError(f"installing ModelOpt into {target} failed: {tail}")
    return python


def run_modelopt(
    prepared: Path,
    out: Path,
    mode: str,
    method: str,
    states: list[CanvasState],
    batch: int,
    exclude: list[str],
) -> dict:
    """Quantise ``prepared`` into ``out`` with ModelOpt in its own environment.

    Args:
        prepared: the float graph (``ort_backend.prepare_graph``).
        out: where to write the Q/DQ graph (weights in ``out.name + '.data'``).
        mode: "int8", "fp8" or "int4".
        method: ModelOpt's calibration method ("entropy", "max", "awq_clip", "awq_lite",
            "rtn_dq").
        states: calibration states.
        batch: the artifact's fixed batch.
        exclude: exact node names to leave in high precision.
    Returns:
        The worker's report (seconds, modelopt version).
    """
    reason = unavailable_reason()
    if reason:
        raise DllmExportError(reason)
    batches = list(batched(states, batch))
    if not batches:
        # rtn_dq reads no statistics, but ModelOpt takes the input shapes from the data.
        shape = (batch, _graph_seq_len(prepared))
        batches = [(np.zeros(shape, np.int64), np.ones(shape, np.int64))]
    with tempfile.TemporaryDirectory(prefix="dllm-modelopt-") as tmp:
        calibration = Path(tmp) / "calibration.npz"
        np.savez(
            calibration,
            input_ids=np.concatenate([b[0] for b in batches]),
            attention_mask=np.concatenate([b[1] for b in batches]),
        )
        request = Path(tmp) / "request.json"
        request.write_text(
            json.dumps(
                {
                    # The worker runs in the temporary directory: paths must be absolute.
                    "onnx_path": str(Path(prepared).resolve()),
                    "output_path": str(Path(out).resolve()),
                    "mode": mode,
                    "method": method,
                    "calibration": str(calibration),
                    "op_types": ["MatMul"],
                    # ModelOpt reads these as regular expressions.
                    "nodes_to_exclude": [f"^{re.escape(name)}$" for name in exclude],
                    "high_precision_dtype": "fp32",
                }
            )
        )
        done = subprocess.run(
            [str(modelopt_python()), str(WORKER), str(request)],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        raise DllmExportError(f"ModelOpt {mode}/{method} failed: {' | '.join(tail)}")
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _graph_seq_len(graph: Path) -> int:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value)
