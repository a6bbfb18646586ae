"""The ONNX Runtime backend: an exported artifact on the CPU, CUDA or TensorRT provider.

Cached graphs (contract.py) run through IOBinding: the cache is one numpy array per layer
and kind, wrapped once as an OrtValue (on the CPU that shares the array's memory), bound
as the ``past_*`` inputs of every step and as the ``present_*`` outputs of the prefill, so
the prefill writes the cache in place and no step copies it. A step's own keys and values
land in preallocated arrays; a commit copies only its rows into the cache.
``bytes_moved`` counts what crosses between the runtime and ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm_export import contract
from dllm_export.errors import DllmExportError, check_at_least
from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.prediction import Prediction, summarize_logits

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64,
                "bool": np.bool_}


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

        directory = Path(directory)
        check_at_least("--threads", threads, 1, 1024)
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
        self.directory, self.manifest = directory, manifest
        self.threads, self.provider_name = threads, provider
        self.session = self._open(graph)
        self.provider = provider
        self.outputs = manifest.get("outputs", "decode")
        self.seq_len = manifest["shapes"]["seq_len"]
        self.batch_size = manifest["shapes"]["batch"]
        self.topk = manifest.get("topk", 8)
        self.special_ids = tuple(manifest.get("special_ids", ()))
        self.input_names = {i.name for i in self.session.get_inputs()}
        self._check_graph(graph)
        self.graphs = contract.graph_specs(manifest, str(directory / "manifest.json"))
        self.has_cached_graphs = bool(self.graphs)
        self.sessions, self.bound = {}, {}
        self.cache_arrays = None
        self.bytes_moved = {"inputs": 0, "outputs": 0, "cache_writes": 0}
        # on_feeds(graph name, feeds) sees every cached call's inputs, past included
        # (calibration records the states each cached graph meets); None: no copies made.
        self.on_feeds = None

    def _check_graph(self, graph: Path) -> None:
        """The manifest's shapes against the graph's own (a hand-edited manifest is refused
        here, not by ONNX Runtime mid-generation)."""
        inputs = {i.name: list(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: list(o.shape) for o in self.session.get_outputs()}
        wanted = [self.batch_size, self.seq_len]
        checks = [("input input_ids", inputs.get("input_ids"), wanted, "shapes")]
        if "topk_ids" in outputs:
            checks.append(("output topk_ids", outputs["topk_ids"][-1:], [self.topk], "topk"))
        if "special_logprobs" in outputs:
            checks.append(("output special_logprobs", outputs["special_logprobs"][-1:],
                           [len(self.special_ids)], "special_ids"))
        for what, found, expected, field in checks:
            if found != expected:
                raise DllmExportError(
                    f"{graph}: graph {what} is {found} but manifest.json ({field}) says "
                    f"{expected}; the manifest was edited or belongs to another graph: "
                    "re-export the artifact")

    def _open(self, graph: Path):
        import onnxruntime as ort

        if not graph.is_file():
            raise DllmExportError(f"{graph}: graph file named in manifest.json is missing")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(
                str(graph), options,
                providers=provider_list(self.provider_name, self.directory, self.manifest))
        except DllmExportError:
            raise
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DllmExportError(f"{graph}: onnxruntime cannot load it ({err})") from None

    def _feeds(self, input_ids, attention_mask):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ascontiguousarray(attention_mask, dtype=np.int64)
        self.bytes_moved["inputs"] += sum(a.nbytes for a in feeds.values())
        return feeds

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        if self.outputs == "logits":  # a logits-only artifact: summarise here
            logits = self._run_logits(input_ids, attention_mask)
            return summarize_logits(logits, self.topk, self.special_ids)
        ids, logprobs, entropy, special = self.session.run(
            list(contract.DECODE_OUTPUTS), self._feeds(input_ids, attention_mask))
        self.bytes_moved["outputs"] += ids.nbytes + logprobs.nbytes + entropy.nbytes + special.nbytes
        return Prediction(ids, logprobs, entropy, special, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        if not self.has_logits:
            return super()._run_logits(input_ids, attention_mask)
        return self.session.run(["logits"], self._feeds(input_ids, attention_mask))[0]

    # --------------------------------------------------------------- cached graphs

    def reset_cache(self, batch: int, capacity: int) -> None:
        import onnxruntime as ort

        self._check_capacity(capacity)
        if self.cache_arrays is None:  # allocated once, reused by every generation
            spec = self.graphs["prefill"]
            self.cache_arrays = {}
            for tensor in spec.outputs[len(contract.DECODE_OUTPUTS):]:
                if tensor.dtype not in NUMPY_DTYPES:
                    raise DllmExportError(
                        f"{self.directory}: a {tensor.dtype} key/value cache has no numpy "
                        "type for ONNX Runtime's IOBinding here; run the cached graphs on "
                        "TensorRT, or export with --dtype fp32 or fp16")
                array = np.zeros(tensor.shape, dtype=NUMPY_DTYPES[tensor.dtype])
                self.cache_arrays[tensor.name.replace("present_", "", 1)] = (
                    array, ort.OrtValue.ortvalue_from_numpy(array))

    def _binding(self, name: str):
        """The session and IOBinding of a cached graph, with the cache bound once."""
        import onnxruntime as ort

        if name not in self.bound:
            spec = self.graphs[name]
            session = self.sessions.get(name) or self._open(self.directory / spec.file)
            self.sessions[name] = session
            found = {i.name: list(i.shape) for i in session.get_inputs()}
            wanted = {t.name: list(t.shape) for t in spec.inputs}
            if found != wanted:
                odd = next(n for n in {*found, *wanted} if found.get(n) != wanted.get(n))
                raise DllmExportError(
                    f"{self.directory / spec.file}: input {odd!r} is {found.get(odd)} in the "
                    f"graph but {wanted.get(odd)} in manifest.json; re-export the artifact")
            binding = session.io_binding()
            outputs = {}
            for tensor in spec.outputs:
                cache_name = tensor.name.replace("present_", "", 1)
                if spec.capacity == 0 and cache_name in self.cache_arrays:
                    array, value = self.cache_arrays[cache_name]  # prefill writes in place
                else:
                    array = np.empty(tensor.shape, dtype=NUMPY_DTYPES[tensor.dtype])
                    value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_output(tensor.name, value)
                outputs[tensor.name] = array
            for tensor in spec.inputs:
                if tensor.name.startswith("past_"):
                    binding.bind_ortvalue_input(
                        tensor.name, self.cache_arrays[tensor.name.replace("past_", "", 1)][1])
            self.bound[name] = (session, binding, outputs, spec)
        return self.bound[name]

    def _run_bound(self, name, input_ids, position_ids, attention_mask):
        session, binding, outputs, spec = self._binding(name)
        feeds = {}
        for input_name, array, dtype in (("input_ids", input_ids, np.int64),
                                         ("position_ids", position_ids, np.int64),
                                         ("attention_mask", attention_mask, np.bool_)):
            array = np.ascontiguousarray(array, dtype=dtype)
            binding.bind_cpu_input(input_name, array)
            self.bytes_moved["inputs"] += array.nbytes
            feeds[input_name] = array
        if self.on_feeds is not None:
            for tensor in spec.inputs:
                if tensor.name.startswith("past_"):
                    cache = self.cache_arrays[tensor.name.replace("past_", "", 1)][0]
                    feeds[tensor.name] = cache.copy()
            self.on_feeds(name, {k: v.copy() for k, v in feeds.items()})
        session.run_with_iobinding(binding)
        head = [outputs[n].copy() for n in contract.DECODE_OUTPUTS]
        self.bytes_moved["outputs"] += sum(a.nbytes for a in head)
        return Prediction(*head, self.special_ids), outputs, spec

    def _run_prefill(self, input_ids, position_ids, attention_mask) -> Prediction:
        pred, _, _ = self._run_bound("prefill", input_ids, position_ids, attention_mask)
        return pred

    def _run_cached_step(self, input_ids, position_ids, attention_mask, write) -> Prediction:
        name = self._graph_for(input_ids.shape[1])
        pred, outputs, spec = self._run_bound(name, input_ids, position_ids, attention_mask)
        self._last_outputs = outputs
        if write is not None:
            self.commit(write)
        return pred

    def commit(self, write) -> None:
        row, slot, count = write
        for cache_name, (array, _) in self.cache_arrays.items():
            new = self._last_outputs["present_" + cache_name][:, :, row:row + count]
            array[:, :, slot:slot + count] = new
            self.bytes_moved["cache_writes"] += new.nbytes
