"""The ONNX Runtime backend: an exported artifact on the CPU, CUDA or TensorRT provider.

Cached graphs (contract.py) run through IOBinding: the cache is one numpy array per layer
and kind, wrapped once as an OrtValue (on the CPU that shares the array's memory), bound
as the ``past_*`` inputs of every step and as the ``present_*`` outputs of the prefill, so
the prefill writes the cache in place and no step copies it. A step's own keys and values
land in preallocated arrays; a commit copies only its rows into the cache.
``bytes_moved`` counts what crosses between the runtime and ONNX Runtime.
"""

from __future__ import annotations

import re
import sys
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


# The manifest key under which ``build --via ort-trt`` records the TensorRT provider's
# options; provider_list reads it back so a run uses the options its engine cache was
# built with (the EP rebuilds, or misses, its cache when they differ).
ORT_TRT_KEY = "ort_tensorrt"
CACHE_PATHS = ("trt_engine_cache_path", "trt_timing_cache_path")


def recorded_tensorrt_options(directory: Path, manifest: dict) -> dict:
    """The TensorRT-EP options ``build --via ort-trt`` recorded, with the cache folders made
    absolute (the EP resolves relative paths against the working directory)."""
    options = dict((manifest.get(ORT_TRT_KEY) or {}).get("options") or {})
    for key in CACHE_PATHS:
        if key in options:
            options[key] = str((Path(directory) / options[key]).resolve())
    return options


def linked_tensorrt_major(provider_library: Path) -> int | None:
    """The TensorRT major the ONNX Runtime TensorRT provider library links (the soname
    ``libnvinfer.so.N`` / ``nvinfer_N.dll`` in its dynamic section)."""
    found = re.findall(rb"libnvinfer\.so\.(\d+)|nvinfer_(\d+)\.dll",
                       Path(provider_library).read_bytes())
    majors = {int(a or b) for a, b in found}
    return max(majors) if majors else None


def installed_tensorrt() -> str | None:
    """The TensorRT version pip installed here (without importing it), or None."""
    from importlib import metadata

    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-libs",
                 "tensorrt-cu13-libs", "tensorrt-cu12-libs"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _can_load(soname: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def tensorrt_link_problem(ort, installed=installed_tensorrt, can_load=_can_load) -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot load here, in one line, or None.

    The PyPI onnxruntime-gpu wheels link one TensorRT major (1.31: ``libnvinfer.so.10``);
    with another major installed (``pip install tensorrt`` gives 11.x) the provider library
    fails to load and ONNX Runtime would quietly run on the next provider."""
    capi = Path(ort.__file__).parent / "capi"
    libraries = [*capi.glob("libonnxruntime_providers_tensorrt.so"),
                 *capi.glob("onnxruntime_providers_tensorrt.dll")]
    if not libraries:
        return (f"onnxruntime {ort.__version__} here has no TensorRT provider library in "
                f"{capi}; install onnxruntime-gpu")
    major = linked_tensorrt_major(libraries[0])
    if major is None or can_load(f"libnvinfer.so.{major}") or can_load(f"nvinfer_{major}.dll"):
        return None
    have = installed()
    found = f"this machine has TensorRT {have}" if have else \
        f"no TensorRT {major}.x library is installed or on the library path"
    return (f"onnxruntime {ort.__version__}'s TensorRT provider links libnvinfer.so.{major} "
            f"(TensorRT {major}.x) and {found}, so it cannot load: use --via tensorrt "
            f"(TensorRT's own builder), or install TensorRT {major}.x "
            f"(pip install 'tensorrt-cu12>={major},<{major + 1}') with its libraries on "
            "LD_LIBRARY_PATH")


def provider_list(provider: str, directory: Path, manifest: dict) -> list:
    """The provider chain for ``provider``, with the TensorRT EP's engine cache in the
    artifact directory (engines are specific to the GPU and TensorRT version) and the
    options ``build --via ort-trt`` recorded."""
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
        problem = tensorrt_link_problem(ort)
        if problem:
            raise DllmExportError(problem)
        cache = directory / "ort-trt-cache"
        options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": manifest.get("dtype") == "fp16",
            "trt_bf16_enable": manifest.get("dtype") == "bf16",
        }
        options.update(recorded_tensorrt_options(directory, manifest))
        chain.append((PROVIDERS["tensorrt"], options))
    if provider in ("tensorrt", "cuda"):
        chain.append(PROVIDERS["cuda"])
    chain.append(PROVIDERS["cpu"])
    return chain


def check_session_providers(session, chain: list, what: str, fallback: bool = False):
    """Refuse a session that dropped a provider it was asked for (ONNX Runtime lists a GPU
    provider as available and then quietly runs on the next one when its libraries do not
    load). Returns None, or with ``fallback`` the one line saying what it fell back to."""
    wanted = [entry[0] if isinstance(entry, tuple) else entry for entry in chain]
    got = list(session.get_providers())
    missing = [name for name in wanted if name not in got]
    if not missing:
        return None
    line = (f"{what}: onnxruntime created the session on {', '.join(got)}, without "
            f"{', '.join(missing)} that was asked for (its libraries did not load: CUDA, "
            "cuDNN or TensorRT missing or of another major version)")
    if not fallback:
        raise DllmExportError(f"{line}; fix the install, or allow the fallback explicitly "
                              "(OrtBackend(..., fallback=True))")
    return f"{line}; running on {got[0]} as allowed"


MEMORY_MODES = ("fast", "lean")
_ARENA = {}


def shared_arena() -> bool:
    """One CPU arena for every session of this process (registered once, growing by what
    is asked rather than doubling); False where ONNX Runtime refuses it."""
    import onnxruntime as ort

    if "ok" not in _ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        try:  # max_mem 0 (no cap), extend strategy 1 (kSameAsRequested), defaults
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _ARENA["ok"] = True
        except Exception as err:  # registered already by the application: use that one
            _ARENA["ok"] = "already" in str(err).lower()
    return _ARENA["ok"]


# The ops whose constant inputs are weights ONNX Runtime reads as they are. Only tensors
# that feed nothing else are shared: its graph optimizers rewrite constants that feed
# elementwise ops (ONNX Runtime 1.32's transpose optimiser changes a shared RoPE table's
# shape and the session then fails), and those tables are small.
WEIGHT_OPS = {"MatMul", "Gemm", "Gather", "GatherND", "MatMulInteger", "QLinearMatMul",
              "MatMulIntegerToFloat", "DequantizeLinear", "GatherBlockQuantized", "MoE"}


# Weight-only kernels that are only fast on their pre-packed weights (bench_peer_llamacpp:
# an 8-bit MatMulNBits artifact's dual-cache generation 5.8x slower unpacked, 816 vs 757 MB).
PACKED_ONLY = {"MatMulNBits", "QMoE"}


class SharedWeights:
    """An artifact's external weights, memory-mapped once and handed to every session as
    shared initializers (ONNX Runtime neither copies nor packs them): one resident copy,
    and only the pages a graph reads (an embedding's gathered rows, not the table)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files, self.values = {}, {}

    def initializers(self, graph: Path):
        try:
            import onnx
            from onnx.helper import tensor_dtype_to_np_dtype
        except ImportError:
            raise DllmExportError("--memory lean reads the graph's weight table with the onnx "
                                  "package: pip install onnx (or use --memory fast)") from None
        model = onnx.load(str(graph), load_external_data=False)
        packed = sorted({n.op_type for n in model.graph.node} & PACKED_ONLY)
        if packed:
            raise DllmExportError(
                f"--memory lean: {graph.name} holds {', '.join(packed)} blocks, which ONNX "
                "Runtime runs 5-6x slower unpacked (and with more memory, measured); use "
                "--memory fast for weight-only quantised artifacts")
        consumers = {}
        for node in model.graph.node:  # the main graph's: subgraphs' weights are not shared
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
        for tensor in model.graph.initializer:
            entry = {e.key: e.value for e in tensor.external_data}
            if "location" not in entry or not consumers.get(tensor.name, {""}) <= WEIGHT_OPS:
                continue
            try:
                dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
            except (KeyError, TypeError):
                continue  # a type numpy has no array for: ONNX Runtime loads it itself
            key = (entry["location"], int(entry.get("offset", 0)))
            if key not in self.values:
                self.values[key] = self._value(key, dtype, tuple(tensor.dims), graph)
            yield tensor.name, self.values[key]

    def _value(self, key, dtype, shape, graph):
        import onnxruntime as ort

        location, offset = key
        if location not in self.files:
            path = (self.directory / location).resolve()
            if self.directory.resolve() not in path.parents or not path.is_file():
                raise DllmExportError(f"{graph}: external data {location!r} is not a file of "
                                      "the artifact; re-export it")
            self.files[location] = np.memmap(path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(self.files[location], dtype=dtype, count=count,
                              offset=offset).reshape(shape)
        return ort.OrtValue.ortvalue_from_numpy(array)


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, directory: Path, manifest: dict, provider: str = "cpu",
                 threads: int | None = None, logits: bool = False, fallback: bool = False,
                 memory: str = "fast"):
        """``logits=True`` loads the graph variant that also outputs full logits (for eval,
        calibration and CFG on decode-head artifacts). ``fallback=True`` lets a session
        that lost a GPU provider run on what it got, saying so on stderr (``fell_back``);
        otherwise that is refused. ``memory`` (MEMORY_MODES): "fast" lets each graph's
        session pre-pack its own copy of the weights; "lean" gives every graph one shared,
        memory-mapped copy and packs nothing (slower block steps: docs/performance.md)."""

        directory = Path(directory)
        check_at_least("--threads", threads, 1, 1024)
        if memory not in MEMORY_MODES:
            raise DllmExportError(f"--memory {memory!r}: choose one of {', '.join(MEMORY_MODES)}")
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
        self.fallback, self.fell_back = fallback, None
        self.memory = memory
        self.weights = SharedWeights(directory) if memory == "lean" else None
        self.graph_file, self._session, self.canvas_runs = graph, None, 0
        self.provider = provider
        self.outputs = manifest.get("outputs", "decode")
        self.seq_len = manifest["shapes"]["seq_len"]
        self.batch_size = manifest["shapes"]["batch"]
        self.topk = manifest.get("topk", 8)
        self.special_ids = tuple(manifest.get("special_ids", ()))
        self.row_shift = int(bool(manifest.get("shift_logits")))
        self.open_canvas()  # now: a missing provider or an edited manifest fails at load
        self.graphs = contract.graph_specs(manifest, str(directory / "manifest.json"))
        self.has_cached_graphs = bool(self.graphs)
        self.sessions, self.bound = {}, {}
        self.cache_arrays = None
        self.bytes_moved = {"inputs": 0, "outputs": 0, "cache_writes": 0}
        # on_feeds(graph name, feeds) sees every cached call's inputs, past included
        # (calibration records the states each cached graph meets); None: no copies made.
        self.on_feeds = None

    @property
    def session(self):
        """The full-canvas graph's session. Dropped when the cached graphs open before it has
        run (a cached generation need not hold its weights), and opened again if needed."""
        return self.open_canvas()

    def open_canvas(self):
        if self._session is None:
            session = self._open(self.graph_file)
            self._check_graph(session, self.graph_file)
            self._session = session
            self.input_names = {i.name for i in session.get_inputs()}
        return self._session

    def _check_graph(self, session, graph: Path) -> None:
        """The manifest's shapes against the graph's own (a hand-edited manifest is refused
        here, not by ONNX Runtime mid-generation)."""
        inputs = {i.name: list(i.shape) for i in session.get_inputs()}
        outputs = {o.name: list(o.shape) for o in session.get_outputs()}
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
        # Measured at L=288 with a 126k vocabulary (docs/performance.md, "Peak memory"): the
        # memory pattern's block comes on top of the first run's allocations (+265 MB) at no
        # speed gain, and one arena for all of the process' sessions holds the largest
        # graph's activations instead of each graph's.
        options.enable_mem_pattern = False
        if shared_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
        if self.weights is not None:
            options.add_session_config_entry("session.disable_prepacking", "1")
            for name, value in self.weights.initializers(graph):
                options.add_initializer(name, value)
        chain = provider_list(self.provider_name, self.directory, self.manifest)
        try:
            session = ort.InferenceSession(str(graph), options, providers=chain)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise DllmExportError(f"{graph}: onnxruntime cannot load it ({err})") from None
        note = check_session_providers(session, chain, f"{graph} --provider "
                                       f"{self.provider_name}", self.fallback)
        if note:
            self.fell_back = note
            print(note, file=sys.stderr, flush=True)
        return session

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
        self.canvas_runs += 1
        ids, logprobs, entropy, special = self.session.run(
            list(contract.DECODE_OUTPUTS), self._feeds(input_ids, attention_mask))
        self.bytes_moved["outputs"] += ids.nbytes + logprobs.nbytes + entropy.nbytes + special.nbytes
        return Prediction(ids, logprobs, entropy, special, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        if not self.has_logits:
            return super()._run_logits(input_ids, attention_mask)
        self.canvas_runs += 1
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
            if not self.canvas_runs:
                self._session = None
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
                if spec.capacity == 0 and cache_name in (self.cache_arrays or {}):
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

    def _run_bound(self, name, **arrays):
        """One call of cached graph ``name`` on ``arrays`` (its inputs but the past ones,
        in the spec's dtypes)."""
        session, binding, outputs, spec = self._binding(name)
        feeds = {}
        for tensor in spec.inputs:
            if tensor.name.startswith("past_"):
                continue
            array = np.ascontiguousarray(arrays[tensor.name], dtype=NUMPY_DTYPES[tensor.dtype])
            binding.bind_cpu_input(tensor.name, array)
            self.bytes_moved["inputs"] += array.nbytes
            feeds[tensor.name] = array
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
        pred, _, _ = self._run_bound("prefill", input_ids=input_ids, position_ids=position_ids,
                                     attention_mask=attention_mask)
        return pred

    def _run_rows(self, input_ids, attention_mask, head_rows) -> Prediction:
        pred, _, _ = self._run_bound("rows", input_ids=input_ids, attention_mask=attention_mask,
                                     head_rows=head_rows)
        return pred

    def _run_cached_step(self, input_ids, position_ids, attention_mask, write) -> Prediction:
        name = self._graph_for(input_ids.shape[1])
        pred, outputs, spec = self._run_bound(name, input_ids=input_ids,
                                              position_ids=position_ids,
                                              attention_mask=attention_mask)
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
