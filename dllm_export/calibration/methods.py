"""The quantisation methods, as data: which backend, which graph format, which runtimes.

| precision | method         | backend      | format | calibrated | runs on                  |
|-----------|----------------|--------------|--------|------------|--------------------------|
| int8      | minmax         | onnxruntime  | qdq    | yes        | TensorRT, ONNX Runtime   |
| int8      | entropy        | onnxruntime  | qdq    | yes        | TensorRT, ONNX Runtime   |
| int8      | percentile     | onnxruntime  | qdq    | yes        | TensorRT, ONNX Runtime   |
| int8      | modelopt-max   | modelopt     | qdq    | yes        | TensorRT, ONNX Runtime   |
| int8      | modelopt-entropy | modelopt   | qdq    | yes        | TensorRT, ONNX Runtime   |
| int8      | nbits          | onnxruntime  | nbits  | no         | ONNX Runtime             |
| int4      | nbits          | onnxruntime  | nbits  | no         | ONNX Runtime             |
| int8/int4 | qmoe           | onnxruntime  | qmoe   | no         | ONNX Runtime             |
| int4      | awq_clip       | modelopt     | qdq    | yes        | TensorRT, ONNX Runtime   |
| int4      | rtn_dq         | modelopt     | qdq    | no         | TensorRT, ONNX Runtime   |
| int4      | ort-dq         | onnxruntime  | dq     | no         | TensorRT, ONNX Runtime   |
| fp8       | modelopt-max   | modelopt     | qdq    | yes        | TensorRT (CC >= 8.9)     |
| fp8       | modelopt-entropy | modelopt   | qdq    | yes        | TensorRT (CC >= 8.9)     |

``qmoe`` (the default for ``--moe ort`` artifacts) turns ``com.microsoft::MoE`` nodes into
``QMoE`` with per-row expert weights and the other linear layers into MatMulNBits.
``qdq`` graphs are symmetric Q/DQ that TensorRT parses (INT4 is weight-only DequantizeLinear
blocks); ``dq`` graphs are those weight-only blocks written by ONNX Runtime's own quantiser
(``ort-dq``: round-to-nearest, symmetric, block 32, opset 21; no ModelOpt needed);
``nbits`` graphs use ``com.microsoft::MatMulNBits``, which only ONNX Runtime runs.
ModelOpt's ``awq_lite`` is not offered: in 0.47 it calls cupy's ``.get()`` on a numpy array
when calibrating on the CPU and fails.

Defaults (from the measurements in docs/quantization.md): int8 ``minmax``, int4 ``nbits``
for ONNX Runtime targets and ``awq_clip`` for TensorRT targets, fp8 ``modelopt-max``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_export.errors import DllmExportError


@dataclass(frozen=True)
class Method:
    precision: str
    name: str
    backend: str  # "onnxruntime" or "modelopt"
    format: str  # "qdq", "dq" (weight-only DequantizeLinear blocks), "nbits" or "qmoe"
    calibrated: bool
    libraries: tuple[
        str, ...
    ]  # engine libraries (device profiles' engine_library) that run it
    backend_method: str  # the backend's own name for it

    @property
    def key(self) -> str:
        return f"{self.precision}/{self.name}"


_ALL = ("tensorrt", "tensorrt_rtx", "onnxruntime")
_TRT = ("tensorrt", "tensorrt_rtx")
METHODS = {
    m.key: m
    for m in (
        Method("int8", "minmax", "onnxruntime", "qdq", True, _ALL, "minmax"),
        Method("int8", "entropy", "onnxruntime", "qdq", True, _ALL, "entropy"),
        Method("int8", "percentile", "onnxruntime", "qdq", True, _ALL, "percentile"),
        Method("int8", "modelopt-max", "modelopt", "qdq", True, _ALL, "max"),
        Method("int8", "modelopt-entropy", "modelopt", "qdq", True, _ALL, "entropy"),
        Method("int8", "nbits", "onnxruntime", "nbits", False, ("onnxruntime",), "rtn"),
        Method("int4", "nbits", "onnxruntime", "nbits", False, ("onnxruntime",), "rtn"),
        Method("int8", "qmoe", "onnxruntime", "qmoe", False, ("onnxruntime",), "rtn"),
        Method("int4", "qmoe", "onnxruntime", "qmoe", False, ("onnxruntime",), "rtn"),
        Method("int4", "awq_clip", "modelopt", "qdq", True, _ALL, "awq_clip"),
        Method("int4", "rtn_dq", "modelopt", "qdq", False, _ALL, "rtn_dq"),
        Method("int4", "ort-dq", "onnxruntime", "dq", False, _ALL, "rtn"),
        Method("fp8", "modelopt-max", "modelopt", "qdq", True, _TRT, "max"),
        Method("fp8", "modelopt-entropy", "modelopt", "qdq", True, _TRT, "entropy"),
    )
}
DEFAULTS = {
    ("int8", None): "minmax",
    ("int4", "onnxruntime"): "nbits",
    ("int4", None): "nbits",
    ("int4", "tensorrt"): "awq_clip",
    ("int4", "tensorrt_rtx"): "awq_clip",
    ("fp8", None): "modelopt-max",
}
PRECISIONS = ("int8", "fp8", "int4")


def resolve_method(precision: str, method: str | None, library: str | None) -> Method:
    """The method for ``--precision``/``--method``, defaulting by the target's library."""
    if precision not in PRECISIONS:
        raise DllmExportError(
            f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
        )
    if method is None:
        method = DEFAULTS.get((precision, library)) or DEFAULTS[(precision, None)]
    found = METHODS.get(f"{precision}/{method}")
    if found is None:
        names = ", ".join(m.name for m in METHODS.values() if m.precision == precision)
        raise DllmExportError(
            f"--method {method!r} is not a {precision} method; choose one of {names}"
        )
    if library is not None and library not in found.libraries:
        raise DllmExportError(
            f"--method {found.name} writes a {found.format} graph, which {library} cannot run; "
            f"for this target choose one of "
            f"{', '.join(m.name for m in METHODS.values() if m.precision == precision and library in m.libraries)}"
        )
    return found
