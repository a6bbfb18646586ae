"""What the build and TensorRT backend tests share: a placeholder artifact directory and the
fixtures that install the TensorRT / CUDA runtime stand-ins (tests/fake_tensorrt.py), once
for TensorRT 10.x and once for 11.x."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fake_tensorrt import TRT10, TRT11

TINY = {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_layers": 2,
        "mlp_hidden_size": 192, "vocab_size": 300}


def write_artifact(directory: Path, config: dict = TINY, precision: str = "fp32",
                   valid: bool = True, seq_len: int = 64, dtype: str = "fp32") -> Path:
    directory.mkdir(parents=True)
    manifest = {
        "format": "dllm-export", "format_version": 1, "kind": "onnx", "family": "llada",
        "source": {"checkpoint": "/ckpt", "fingerprint": "abc", "config": config},
        "graph": {"file": "model.onnx", "data": "model.onnx.data", "opset": 18},
        "shapes": {"batch": 1, "seq_len": seq_len}, "dtype": dtype, "precision": precision,
        "vocab_size": config["vocab_size"], "special_tokens": {"mask_id": 0, "eos_id": 1},
        "special_ids": [1], "topk": 8, "outputs": "decode", "shift_logits": False,
        "moe": None, "generation_defaults": {"algorithm": "llada"},
        "inputs": [{"name": "input_ids", "shape": [1, seq_len], "dtype": "int64"},
                   {"name": "attention_mask", "shape": [1, seq_len], "dtype": "int64"}],
        "output_specs": [], "versions": {"torch": "2.13"}, "validation": {"passed": True},
        "quantization": None, "valid": valid,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "model.onnx").write_bytes(b"graph")
    (directory / "model.onnx.data").write_bytes(b"weights" * 100)
    (directory / "tokenizer.json").write_text("{}")
    return directory




def install_stand_ins(monkeypatch):
    """A function (version, parse_ok, capture_ok) -> log that installs the stand-ins for
    ``tensorrt`` and the CUDA runtime (undone by ``monkeypatch`` after the test)."""
    from fake_tensorrt import FakeCudart, make_tensorrt

    from dllm_export.runtime import cuda

    def install(version=TRT10, parse_ok=True, capture_ok=True) -> dict:
        log: dict = {}
        monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(log, version, parse_ok))
        fake_runtime = FakeCudart(log, capture_ok)
        monkeypatch.setattr(cuda, "cudart", lambda: fake_runtime)
        log["cuda"] = fake_runtime
        return log

    return install


# Test modules declare the fixtures with these (importing fixtures would shadow them):
#     @pytest.fixture(params=VERSIONS, ids=VERSION_IDS)
#     def trt_version(request): return request.param
VERSIONS, VERSION_IDS = [TRT10, TRT11], ["trt10", "trt11"]


def versioned(install, version):
    """``install`` defaulting to ``version``: a test asking for ``fakes`` runs for both."""
    return lambda version_override=None, **kw: install(version_override or version, **kw)
