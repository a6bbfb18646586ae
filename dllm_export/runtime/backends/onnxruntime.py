"""The ONNX Runtime backend: an exported artifact on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.prediction import Prediction, summarize_logits

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DECODE_OUTPUTS = ("topk_ids", "topk_logprobs", "neg_entropy", "special_logprobs")


def provider_list(provider: str, directory: Path, manifest: dict) -> list:
    """The provider chain for ``provider``, with the TensorRT EP's engine cache in the
    artifact directory (engines are specific to the GPU and TensorRT version)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise DllmExportError(f"--provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise DllmExportError(
            f"--provider {provider}: onnxruntime {ort.__version__} here offers "
            f"{', '.join(available)}; install onnxruntime-gpu (and TensorRT for 'tensorrt')"
        )
    chain: list = []
    if provider == "tensorrt":
        cache = directory / "ort-trt-cache"
        chain.append((PROVIDERS["tensorrt"], {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": manifest.get("dtype") == "fp16",
            "trt_bf16_enable": manifest.get("dtype") == "bf16",
        }))
    if provider in ("tensorrt", "cuda"):
        chain.append(PROVIDERS["cuda"])
    chain.append(PROVIDERS["cpu"])
    return chain


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, directory: Path, manifest: dict, provider: str = "cpu",
                 threads: int | None = None, logits: bool = False):
        """``logits=True`` loads the graph variant that also outputs full logits (for eval,
        calibration and CFG on decode-head artifacts)."""
        import onnxruntime as ort

        directory = Path(directory)
        graph = directory / manifest["graph"]["file"]
        self.has_logits = manifest.get("outputs") == "logits"
        if logits and not self.has_logits:
            if not manifest["graph"].get("logits_file"):
                raise DllmExportError(
                    f"{directory}: this artifact has no logits graph; re-export it")
            graph = directory / manifest["graph"]["logits_file"]
            self.has_logits = True
        if not graph.is_file():
            raise DllmExportError(f"{graph}: graph file named in manifest.json is missing")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(graph), options, providers=provider_list(provider, directory, manifest))
        except DllmExportError:
            raise
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DllmExportError(f"{graph}: onnxruntime cannot load it ({err})") from None
        self.provider = provider
        self.outputs = manifest.get("outputs", "decode")
        self.seq_len = manifest["shapes"]["seq_len"]
        self.batch_size = manifest["shapes"]["batch"]
        self.topk = manifest.get("topk", 8)
        self.special_ids = tuple(manifest.get("special_ids", ()))
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _feeds(self, input_ids, attention_mask):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ascontiguousarray(attention_mask, dtype=np.int64)
        return feeds

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        if self.outputs == "logits":  # a logits-only artifact: summarise here
            logits = self._run_logits(input_ids, attention_mask)
            return summarize_logits(logits, self.topk, self.special_ids)
        ids, logprobs, entropy, special = self.session.run(
            list(DECODE_OUTPUTS), self._feeds(input_ids, attention_mask))
        return Prediction(ids, logprobs, entropy, special, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        if not self.has_logits:
            return super()._run_logits(input_ids, attention_mask)
        return self.session.run(["logits"], self._feeds(input_ids, attention_mask))[0]
