"""``build --via ort-trt``: for apps that live in ONNX Runtime.

The output directory is the artifact (graph, weights, tokenizer, manifest) plus the TensorRT
execution provider's engine and timing caches in ``ort-trt-cache/``, filled by creating a
session and running it once, so the first ``run --provider tensorrt`` starts in seconds. The
provider options are the ONNX Runtime backend's own (``provider_list``), with the device
profile's workspace and optimisation level added. The cache holds a TensorRT engine: like any
engine it is valid only on this GPU model and this TensorRT version.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import atomic_directory, write_json
from dllm_export.runtime.backends.onnxruntime import (
    CACHE_PATHS,
    ORT_TRT_KEY,
    check_session_providers,
    provider_list,
    tensorrt_link_problem,
)

TRT_EP = "TensorrtExecutionProvider"


def _link_or_copy(source: Path, target: Path) -> None:
    # A copy, not a hard link: onnx (1.17+) refuses to load external data from a file with
    # several links ("potential hardlink attack"), so a link would make the source
    # artifact unloadable for quantize, validate and TensorRT's ONNX loader afterwards.
    shutil.copy2(source, target)


def provider_chain(directory: Path, manifest: dict, plan) -> list:
    """The ONNX Runtime provider list used to build (and later to run) the engine."""
    chain = provider_list("tensorrt", directory, manifest)
    name, options = chain[0]
    precision, profile = plan.chosen.precision, plan.profile
    options = dict(options)
    options.update({
        "trt_max_workspace_size": max(profile.build.workspace_bytes, 1 << 20),
        "trt_builder_optimization_level": profile.build.optimization_level,
        "trt_fp16_enable": precision == "fp16",
        "trt_bf16_enable": precision == "bf16",
        "trt_int8_enable": precision == "int8",
    })
    return [(name, options), *chain[1:]]


def _zero_feeds(manifest: dict) -> dict:
    return {spec["name"]: np.zeros(spec["shape"], np.int64) for spec in manifest["inputs"]}


def build_ort_trt(artifact_dir: Path, manifest: dict, plan, out_dir: Path, options) -> dict:
    """Copy the artifact to ``out_dir`` and fill its TensorRT-EP engine cache."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DllmExportError("onnxruntime is not installed: pip install onnxruntime-gpu "
                              "(with TensorRT's libraries on the library path)") from None
    if TRT_EP not in ort.get_available_providers():
        raise DllmExportError(
            f"onnxruntime {ort.__version__} here has no {TRT_EP} (it offers "
            f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu and "
            "TensorRT (on a Jetson: the onnxruntime-gpu wheel for your JetPack)")
    problem = tensorrt_link_problem(ort)  # e.g. a TensorRT 10 provider with TensorRT 11
    if problem:
        raise DllmExportError(f"--via ort-trt: {problem}")
    with atomic_directory(out_dir, overwrite=options.overwrite, inputs=(artifact_dir,)) as tmp:
        for child in Path(artifact_dir).iterdir():
            if child.is_file() and child.name != "manifest.json":
                _link_or_copy(child, tmp / child.name)
        # Built in the temporary directory, which is renamed to out_dir: onnxruntime names
        # cached engines after the graph's file name and contents, not its folder.
        chain = provider_chain(tmp, manifest, plan)
        cache = Path(chain[0][1]["trt_engine_cache_path"])
        started = time.perf_counter()
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(tmp / manifest["graph"]["file"]),
                                           session_options, providers=chain)
            check_session_providers(session, chain, f"{artifact_dir} --via ort-trt")
            session.run(None, _zero_feeds(manifest))  # the EP builds engines on first run
        except DllmExportError:
            raise
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DllmExportError(f"{artifact_dir}: onnxruntime's TensorRT provider could not "
                                  f"build it ({str(err).splitlines()[0]})") from None
        if not any(cache.glob("*.engine")):
            raise DllmExportError(f"{artifact_dir}: onnxruntime wrote no TensorRT engine; "
                                  "TensorRT could not take the graph (rerun with "
                                  "ORT_LOG_LEVEL=0 to see why)")
        recorded = {key: value for key, value in chain[0][1].items() if key not in CACHE_PATHS}
        recorded.update({key: "ort-trt-cache" for key in CACHE_PATHS})  # relative: it moves
        result = dict(manifest)
        result[ORT_TRT_KEY] = {
            "profile": plan.profile.name,
            "precision": plan.chosen.precision,
            "onnxruntime": ort.__version__,
            "providers": session.get_providers(),
            "options": recorded,
            "engine_cache": cache.name,
            "build_seconds": round(time.perf_counter() - started, 2),
            "note": "run with --provider tensorrt; the cache is valid only on this GPU model "
                    "and TensorRT version",
        }
        write_json(tmp / "manifest.json", result)
    return result
