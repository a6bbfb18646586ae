"""Precisions: what each costs in bytes, which tensor-core peak it runs at, and which GPUs
can run it.

A *precision* names how the denoiser's matrices are stored and multiplied:

| precision | matrix weights                         | activations | compute peak used       |
|-----------|----------------------------------------|-------------|-------------------------|
| fp32      | 4 bytes                                | fp32        | tf32 if listed, else fp32 |
| fp16/bf16 | 2 bytes                                | 16-bit      | fp16 / bf16             |
| int8/fp8  | 1 byte (per-channel scales ignored)    | 16-bit      | int8 / fp8 (W8A8)       |
| int4      | 0.5 byte + an fp16 scale per 128       | 16-bit      | fp16 (weight-only, W4A16) |
| fp4       | 0.5 byte + an fp8 scale per 16 (NVFP4) | 16-bit      | fp4 (W4A4)              |

Quantised artifacts keep the embedding, the LM head, routers, norms and biases in 16-bit
(the calibration issue's default), so those bytes are counted at 2 per parameter.
"""

from __future__ import annotations

from dllm_export.errors import DllmExportError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp4")
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
# Q/DQ artifacts: TensorRT must build them as strongly typed networks.
QUANTIZED = ("fp8", "int8", "int4", "fp4")
# Peak-throughput keys a device profile may list (tf32 is fp32 GEMMs on tensor cores).
PEAK_KEYS = PRECISIONS + ("tf32",)

MATRIX_BYTES = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + 2 / 128,
    "fp4": 0.5 + 1 / 16,
}

# Hardware floors from the CUDA/TensorRT support matrices: bf16 tensor cores arrived with
# Ampere (8.0), fp8 with Ada/Hopper (8.9), fp4 with Blackwell (10.0).
MIN_COMPUTE_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9), "fp4": (10, 0)}


def check_known(precision: str, where: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise DllmExportError(
            f"{where}: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    return precision


def kept_bytes(precision: str) -> float:
    """Bytes per parameter of what stays unquantised (embedding, head, router, norms)."""
    return 4.0 if precision == "fp32" else 2.0


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def peak_key(precision: str, peaks: dict) -> str:
    """Which of a profile's ``peak_tflops`` entries bounds GEMMs at this precision."""
    if precision == "fp32":
        return "tf32" if "tf32" in peaks else "fp32"
    if precision == "int4":  # INT4 is weight-only: the math runs in fp16 (fp32 on a CPU)
        return "fp16" if "fp16" in peaks else "fp32"
    return precision


def format_capability(capability: tuple[int, int] | None) -> str:
    return "none" if capability is None else f"{capability[0]}.{capability[1]}"


def hardware_refusal(precision: str, capability: tuple[int, int] | None) -> str | None:
    """Why a GPU of this compute capability cannot run the precision, or None."""
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need is None or capability is None or tuple(capability) >= need:
        return None
    return (
        f"{precision} needs compute capability {format_capability(need)} or newer, "
        f"and this device has {format_capability(capability)}"
    )


def check_precision(profile, precision: str) -> str:
    """Refuse, with one line, a precision the profile's device cannot run.

    Args:
        profile: a ``DeviceProfile``.
        precision: one of ``PRECISIONS``.
    Returns:
        The precision, when the device runs it.
    """
    check_known(precision)
    runs = ", ".join(profile.precisions)
    reason = hardware_refusal(precision, profile.compute_capability)
    if reason:
        raise DllmExportError(
            f"{profile.name}: {reason}; precisions it runs: {runs}"
        )
    if precision not in profile.precisions:
        raise DllmExportError(
            f"{profile.name} does not run {precision} engines; precisions it runs: {runs}"
        )
    return precision
