"""The GPU checks behind scripts/gpu_suite.sh: one subcommand per check, one JSON line each.

    python scripts/gpu_checks.py env
    python scripts/gpu_checks.py cuda-runtime          # runtime/cuda.py on the real GPU
    python scripts/gpu_checks.py trt-loop              # the TensorRT backend's step loop
    python scripts/gpu_checks.py make-1b OUT_DIR       # a ~1B-parameter LLaDA checkpoint
    python scripts/gpu_checks.py compare ARTIFACT ENGINE   # engine vs ONNX Runtime CPU
    python scripts/gpu_checks.py generate ARTIFACT ENGINE
    python scripts/gpu_checks.py cached ARTIFACT ENGINE
    python scripts/gpu_checks.py suite [--dry-run] [--work DIR] [--doc FILE] [--budget S]

``suite`` (gpu_suite.py) runs them in order within a time budget and writes the report.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# ~1B parameters: 20 LLaDA blocks of d 2048 (4 x 2048^2 attention + 3 x 2048 x 5632 MLP)
ONE_B = {"d_model": 2048, "n_heads": 16, "n_kv_heads": 16, "n_layers": 20,
         "mlp_hidden_size": 5632, "max_sequence_length": 4096}


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields}, default=str), flush=True)


def version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception as err:  # report any import failure as text
        return f"missing ({type(err).__name__}: {str(err).splitlines()[0][:120]})"


def env() -> None:
    from dllm_export.runtime.cuda import gpu_info

    info = {name: version_of(name) for name in
            ("torch", "tensorrt", "onnxruntime", "onnx", "cupy", "cuda.bindings", "pytest")}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        gpu = gpu_info()
        info.update(gpu=gpu.name, compute_capability=gpu.compute_capability,
                    cuda_runtime=gpu.cuda_runtime, memory_gib=round(gpu.total_memory / 2**30, 1))
        emit("env", ok=True, **info)
    except Exception as err:
        emit("env", ok=False, gpu=f"unavailable: {err}", **info)


def cuda_runtime() -> None:
    """Streams, device buffers, async and 2-D copies, CUDA-graph capture and replay, through
    runtime/cuda.py on the real device; the captured work is a cupy kernel on our stream."""
    import cupy

    from dllm_export.runtime import cuda

    rng = np.random.default_rng(0)
    stream = cuda.Stream()
    handle = stream.handle
    host = rng.integers(0, 255, size=(4, 3, 64), dtype=np.uint8)
    src, dst = cuda.DeviceBuffer(host.nbytes), cuda.DeviceBuffer(host.nbytes)
    stream.upload(src, host)
    back = np.zeros_like(host)
    stream.download(back, src)
    stream.synchronize()
    # copy_rows: rows 8..24 of every [64]-byte row of src into slots 16..32 of dst
    stream.upload(dst, np.zeros_like(host))
    stream.copy_rows(dst, 16, 64, src, 8, 64, 16, 12)
    rows = np.zeros_like(host)
    stream.download(rows, dst)
    stream.synchronize()
    want_rows = np.zeros_like(host)
    want_rows[..., 16:32] = host[..., 8:24]
    counter = cupy.zeros(1024, cupy.float32)  # allocated before the capture
    add = cupy.ElementwiseKernel("", "float32 x", "x += 1.0f", "add_one")

    def launch():
        with cupy.cuda.ExternalStream(stream.handle):
            add(counter)
        return True

    launch()  # compiles and loads the kernel: module loading is not allowed in a capture
    stream.synchronize()
    captured = stream.capture(launch)  # recorded, not run
    for _ in range(3):
        stream.replay() if captured else launch()
    stream.synchronize()
    replayed = float(counter.get()[0]) - 1.0  # less the warm-up launch
    with cuda.DeviceMemoryPeak(0.01) as peak:
        extra = cuda.DeviceBuffer(64 << 20)
        stream.synchronize()
    extra.free()
    src.free()
    dst.free()
    stream.close()
    ok = bool(np.array_equal(back, host) and np.array_equal(rows, want_rows) and captured
              and replayed == 3.0)
    emit("cuda_runtime", ok=ok, stream_handle=hex(handle),
         roundtrip=bool(np.array_equal(back, host)),
         copy_rows=bool(np.array_equal(rows, want_rows)), graph_captured=captured,
         replays_seen=replayed, peak_device_bytes=peak.peak)


def trt_loop() -> None:
    """The TensorRT backend's own step loop over an engine stand-in that runs a real
    decode-head kernel on the device (gpu_device_engine.py), checked against numpy."""
    import gpu_device_engine as device

    from dllm_export.runtime import cuda
    from dllm_export.runtime.backends.tensorrt import TensorRTBackend

    shape = dict(batch=2, length=64, vocab=512, topk=4, specials=(1, 2))
    log: dict = {}
    sys.modules["tensorrt"] = device.make_tensorrt(log, **shape)
    gpu = cuda.gpu_info()
    manifest = {"engine": "model.engine", "engine_library": "tensorrt",
                "tensorrt_version": sys.modules["tensorrt"].__version__, "gpu_name": gpu.name,
                "compute_capability": gpu.compute_capability, "topk": shape["topk"],
                "shapes": {"batch": shape["batch"], "seq_len": shape["length"]},
                "special_ids": list(shape["specials"]), "build": {}}
    rng = np.random.default_rng(1)
    worst, same_ids, steps = 0.0, True, 6
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.engine").write_bytes(device.MAGIC)
        backend = TensorRTBackend(Path(tmp), manifest)
        mask = np.ones((shape["batch"], shape["length"]), np.int64)
        for step in range(steps):
            ids = rng.integers(0, shape["vocab"], size=mask.shape, dtype=np.int64)
            if step == 3:
                mask[:, -8:] = 0  # a changed mask is uploaded again
            got = backend.predict(ids, mask)
            want = device.reference(log["engine"].table, ids, mask, shape["topk"],
                                    shape["specials"])
            same_ids &= bool(np.array_equal(got.topk_ids, want["topk_ids"]))
            for name in ("topk_logprobs", "neg_entropy", "special_logprobs"):
                worst = max(worst, float(np.abs(getattr(got, name) - want[name]).max()))
        captured = backend.stream.captured
        handle = backend.stream.handle
        backend.close()
    # two launches reach Python (the direct first step and the one the capture records);
    # every later step is a graph replay, right only if the device did the work
    ok = same_ids and worst < 1e-4 and captured and log.get("launches") == 2
    emit("trt_loop", ok=ok, steps=steps, topk_ids_equal=same_ids, max_abs_error=worst,
         tolerance=1e-4, cuda_graph=captured, python_launches=log.get("launches"),
         stream_handle=hex(handle), streams_seen=len(log.get("streams", ())))


def make_1b(out_dir: str) -> None:
    from dllm_export.model_shape import model_shape
    from dllm_export.models.tiny import make_tiny

    path = make_tiny("llada", out_dir, seed=0, dtype="bfloat16", shards=2, overrides=ONE_B,
                     overwrite=True)
    config = json.loads((Path(path) / "config.json").read_text())
    shape = model_shape(config, "llada")
    parameters = shape.total_parameters()
    emit("make_1b", ok=0.9e9 <= parameters <= 1.2e9, checkpoint=str(path),
         parameters=parameters, **ONE_B)


def _canvases(manifest: dict, count: int, seed: int = 0):
    """Canvases with growing masked tails, as the unmasking loop produces them."""
    rng = np.random.default_rng(seed)
    batch, length = manifest["shapes"]["batch"], manifest["shapes"]["seq_len"]
    vocab, mask_id = manifest["vocab_size"], manifest["special_tokens"]["mask_id"]
    for index in range(count):
        ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
        ids[:, length // 2 + index * length // (2 * count):] = mask_id
        ids[:, -1] = mask_id
        yield ids, np.ones_like(ids)


def compare(artifact: str, engine: str) -> None:
    from dllm_export.runtime.artifact import open_backend

    trt_backend, manifest = open_backend(Path(engine))
    ort_backend, _ = open_backend(Path(artifact), provider="cpu")
    top1, logprob = [], []
    for ids, mask in _canvases(manifest, 4):
        got, want = trt_backend.predict(ids, mask), ort_backend.predict(ids, mask)
        top1.append(float((got.topk_ids[..., 0] == want.topk_ids[..., 0]).mean()))
        logprob.append(float(np.abs(got.topk_logprobs[..., 0] - want.topk_logprobs[..., 0]).max()))
    captured = trt_backend.stream.captured
    trt_backend.close()
    # fp32 engines (TF32 GEMMs) agree on nearly every argmax; 16-bit engines less so
    bar = 0.98 if manifest["precision"] == "fp32" else 0.9
    emit("compare", ok=min(top1) >= bar, engine=engine, precision=manifest["precision"],
         precision_from=manifest["build"].get("precision_from"), top1_agreement=min(top1),
         max_abs_top1_logprob=max(logprob), bar=bar, cuda_graph=captured)


def generate(artifact: str, engine: str) -> None:
    from dllm_export.runtime import Generator

    settings = dict(gen_length=32, steps=32, block_length=32, seed=0, temperature=0.0)
    results = {name: Generator.from_artifact(directory).generate("What is 12 + 34?", **settings)
               for name, directory in (("tensorrt", engine), ("onnxruntime_cpu", artifact))}
    trt, ort = results["tensorrt"], results["onnxruntime_cpu"]
    emit("generate", ok=bool(trt.forwards), engine=engine,
         same_tokens_as_ort_cpu=trt.tokens[0] == ort.tokens[0],
         **{f"tensorrt_{k}": v for k, v in trt.stats().items()})


def cached(artifact: str, engine: str) -> None:
    from dllm_export.runtime import Generator

    trt, ort = Generator.from_artifact(engine), Generator.from_artifact(artifact)
    cache = trt.backend.manifest["cache"]
    block = cache["block_length"]
    settings = dict(gen_length=2 * block, steps=2 * block, block_length=block, temperature=0.0)
    modes = {}
    for mode in cache["modes"]:
        got = trt.generate("What is 12 + 34?", cache=mode, **settings)
        want = ort.generate("What is 12 + 34?", cache=mode, **settings)
        modes[mode] = {"same_tokens_as_ort_cpu": got.tokens[0] == want.tokens[0],
                       "forwards": got.forwards}
    emit("cached", ok=all(m["forwards"] for m in modes.values()), engine=engine, modes=modes)


HANDLERS = {"env": env, "cuda-runtime": cuda_runtime, "trt-loop": trt_loop,
            "make-1b": make_1b, "compare": compare, "generate": generate, "cached": cached}

if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["env"]
    if command == "suite":
        from gpu_suite import main

        sys.exit(main(args))
    try:
        HANDLERS[command](*args)
    except Exception as err:  # one failed check must not hide the others
        emit(command.replace("-", "_"), ok=False, args=args,
             error=f"{type(err).__name__}: {str(err)[:300]}",
             trace=traceback.format_exc().splitlines()[-3:])
        sys.exit(1)
