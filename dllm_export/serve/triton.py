"""``dllm-export triton``: a Triton Inference Server model repository for an artifact or engine.

    REPO/NAME/config.pbtxt            Python backend, decoupled, dynamic batching, instances
    REPO/NAME/1/model.py              imports the runtime vendored beside it
    REPO/NAME/1/dllm_export/          our runtime (the package, without its data)
    REPO/NAME/1/artifact/             the artifact or engine files, hash-checked on load

The repository starts unchanged in NVIDIA's Triton container once its Python has numpy,
tokenizers, jinja2 and onnxruntime (or TensorRT for an engine).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dllm_export.errors import DllmExportError, check_at_least
from dllm_export.jsonio import atomic_directory
from dllm_export.runtime.artifact import read_manifest

MODEL_PY = '''"""Triton Python backend entry point written by dllm-export triton."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dllm_export.serve.triton_model import TritonPythonModel  # noqa: E402,F401
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
model_transaction_policy {{
  decoupled: true
}}
input [
  {{
    name: "text_input"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "sampling_parameters"
    data_type: TYPE_STRING
    dims: [ 1 ]
    optional: true
  }}
]
output [
  {{
    name: "text_output"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "finish_reason"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "completion_tokens"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }}
]
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
parameters {{
  key: "artifact"
  value: {{ string_value: "artifact" }}
}}
parameters {{
  key: "provider"
  value: {{ string_value: "{provider}" }}
}}
parameters {{
  key: "threads"
  value: {{ string_value: "{threads}" }}
}}
'''


def write_repository(source, out_dir, name: str | None = None, instances: int = 1,
                     delay_us: int = 10000, provider: str = "cpu", threads: int | None = None,
                     overwrite: bool = False) -> Path:
    """Write the model repository; returns the model's directory."""
    source = Path(source)
    manifest = read_manifest(source, "triton")  # refuses an invalid or tampered artifact in one line
    name = name or source.resolve().name.replace(" ", "_")
    check_at_least("--instances", instances, 1, 1024)
    check_at_least("--max-queue-delay-us", delay_us, 0, 60_000_000)
    batch = int(manifest["shapes"]["batch"])
    kind = "KIND_GPU" if manifest.get("kind") == "tensorrt" or provider != "cpu" else "KIND_CPU"
    out_dir = Path(out_dir)
    package = Path(__file__).resolve().parents[1]
    with atomic_directory(out_dir / name, overwrite=overwrite, inputs=(source,)) as tmp:
        (tmp / "config.pbtxt").write_text(CONFIG.format(
            name=name, max_batch=batch, instances=instances, kind=kind, delay_us=delay_us,
            provider=provider, threads=threads or ""))
        version = tmp / "1"
        version.mkdir()
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(package, version / "dllm_export",
                        ignore=shutil.ignore_patterns("__pycache__", "data", "*.pyc"))
        shutil.copytree(source, version / "artifact")
    return out_dir / name


def pytriton_server(venv, repository, workdir, http_port: int, grpc_port: int,
                    metrics_port: int, host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """The command and environment that run the ``tritonserver`` shipped in an
    nvidia-pytriton install (``venv``, Python 3.x) on ``repository``: its binaries copied
    to ``workdir`` with the Python backend stub for the venv's Python, as pytriton does."""
    import os

    venv = Path(venv)
    found = sorted(venv.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    if not found:
        raise DllmExportError(f"{venv}: no nvidia-pytriton install (pip install nvidia-pytriton "
                              "into that venv)")
    dist = found[-1]
    python = dist.parents[2].name.removeprefix("python")  # lib/python3.11/site-packages
    server = Path(workdir) / "tritonserver"
    if not server.exists():
        shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(dist / "python_backend_stubs" / python / "triton_python_backend_stub",
                    server / "backends" / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    libs = str(dist.parents[1] / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = libs + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # the model imports the runtime vendored in the repository
    command = [str(server / "bin" / "tritonserver"), "--model-repository", str(repository),
               "--backend-directory", str(server / "backends"),
               "--cache-directory", str(server / "caches"),
               "--http-address", host, "--http-port", str(http_port),
               "--grpc-address", host, "--grpc-port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--exit-timeout-secs", "5"]
    return command, env
