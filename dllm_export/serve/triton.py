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

from dllm_export.errors import check_at_least
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
    manifest = read_manifest(source)  # refuses an invalid or tampered artifact in one line
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
