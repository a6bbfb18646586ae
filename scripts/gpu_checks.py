"""The Python half of scripts/gpu_suite.sh: one check per subcommand, one JSON line each.

    python scripts/gpu_checks.py env
    python scripts/gpu_checks.py profile OUT_DIR            # a profile for this GPU
    python scripts/gpu_checks.py compare ARTIFACT ENGINE    # decode head vs ONNX Runtime CPU
    python scripts/gpu_checks.py generate ARTIFACT ENGINE   # end to end, greedy
    python scripts/gpu_checks.py cached ARTIFACT ENGINE     # every cache mode vs ORT CPU
    python scripts/gpu_checks.py time CHECKPOINT ENGINE PROFILE  # step vs PyTorch CUDA
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
            ("torch", "tensorrt", "tensorrt_rtx", "onnxruntime", "polygraphy", "cuda.bindings")}
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        gpu = gpu_info()
        info.update(gpu=gpu.name, compute_capability=gpu.compute_capability,
                    cuda_runtime=gpu.cuda_runtime, memory_gib=round(gpu.total_memory / 2**30, 1))
    except Exception as err:
        info["gpu"] = f"unavailable: {err}"
    emit("env", ok="tensorrt" in info and not info["tensorrt"].startswith("missing"), **info)


def profile(out_dir: str) -> None:
    """Print a shipped TensorRT profile of this GPU's compute capability, or write one."""
    from dllm_export.device_profiles import all_profiles, load_profile
    from dllm_export.runtime.cuda import gpu_info

    cc = gpu_info().compute_capability
    for candidate in all_profiles():
        have = candidate.compute_capability
        if candidate.engine_library == "tensorrt" and have and f"{have[0]}.{have[1]}" == cc:
            print(candidate.name)
            return
    text = load_profile("h100-sxm").path.read_text()
    path = Path(out_dir) / "this-gpu.yaml"
    path.write_text(text.replace('compute_capability: "9.0"', f'compute_capability: "{cc}"')
                    .replace("name: h100-sxm", "name: this-gpu"))
    print(path)


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
    top1, logprob, entropy = [], [], []
    for ids, mask in _canvases(manifest, 4):
        got, want = trt_backend.predict(ids, mask), ort_backend.predict(ids, mask)
        top1.append(float((got.topk_ids[..., 0] == want.topk_ids[..., 0]).mean()))
        logprob.append(float(np.abs(got.topk_logprobs[..., 0] - want.topk_logprobs[..., 0]).max()))
        entropy.append(float(np.abs(got.neg_entropy - want.neg_entropy).max()))
    captured = trt_backend.stream.captured
    trt_backend.close()
    # Bars: fp32 engines (TF32 GEMMs) agree on nearly every argmax; fp16 engines less so.
    bar = 0.98 if manifest["precision"] == "fp32" else 0.9
    emit("compare", ok=min(top1) >= bar, engine=engine, precision=manifest["precision"],
         top1_agreement=min(top1), max_abs_top1_logprob=max(logprob),
         max_abs_neg_entropy=max(entropy), bar=bar, cuda_graph=captured)


def generate(artifact: str, engine: str) -> None:
    from dllm_export.runtime import Generator

    # greedy and short; block_length 32 divides gen_length for the LLaDA loop
    settings = dict(gen_length=32, steps=32, block_length=32, seed=0, temperature=0.0)
    results = {}
    for name, directory in (("tensorrt", engine), ("onnxruntime_cpu", artifact)):
        generator = Generator.from_artifact(directory)
        results[name] = generator.generate("What is 12 + 34?", **settings)
    trt, ort = results["tensorrt"], results["onnxruntime_cpu"]
    same = trt.tokens[0] == ort.tokens[0]
    emit("generate", ok=bool(trt.forwards), engine=engine, same_tokens_as_ort_cpu=same,
         text=trt.texts[0][:80], **{f"tensorrt_{k}": v for k, v in trt.stats().items()},
         ort_cpu_tokens_per_second=ort.stats()["tokens_per_second"])


def cached(artifact: str, engine: str) -> None:
    """Every cache mode the artifact offers, greedy, on the engine (its cached graphs' engines
    and the device-resident cache) against ONNX Runtime CPU: tokens, forwards, tokens/s."""
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
                       "forwards": got.forwards,
                       "tokens_per_second": got.stats()["tokens_per_second"],
                       "ort_cpu_tokens_per_second": want.stats()["tokens_per_second"]}
    emit("cached", ok=all(m["forwards"] for m in modes.values()), engine=engine,
         precision=trt.backend.manifest["precision"], block_length=block, modes=modes)


def _median_ms(fn, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - started))
    return statistics.median(samples)


def time_step(checkpoint: str, engine: str, profile_name: str) -> None:
    import torch

    from dllm_export.device_profiles import load_profile
    from dllm_export.model_shape import model_shape
    from dllm_export.models import load_model, set_moe_strategy
    from dllm_export.roofline import denoiser_step
    from dllm_export.runtime.artifact import open_backend
    from dllm_export.runtime.backends.torch_backend import TorchBackend

    trt_backend, manifest = open_backend(Path(engine))
    ids, mask = next(_canvases(manifest, 1))
    trt_ms = _median_ms(lambda: trt_backend.predict(ids, mask))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        manifest["precision"], torch.float16)
    model, _ = load_model(checkpoint, dtype=dtype)
    set_moe_strategy(model, "sparse")
    reference = TorchBackend(model, tuple(manifest["special_ids"]), manifest["topk"], "cuda")

    def torch_step():
        reference.predict(ids, mask)
        torch.cuda.synchronize()

    torch_ms = _median_ms(torch_step)
    shape = model_shape(manifest["source"]["config"], manifest["family"])
    shapes = manifest["shapes"]
    floor = denoiser_step(shape, load_profile(profile_name), manifest["precision"],
                          shapes["batch"], shapes["seq_len"])
    trt_backend.close()
    emit("time", ok=True, engine=engine, precision=manifest["precision"],
         tensorrt_step_ms=round(trt_ms, 3), torch_cuda_step_ms=round(torch_ms, 3),
         speedup=round(torch_ms / trt_ms, 2), roofline_floor_ms=round(1e3 * floor.floor_seconds, 4),
         bound=floor.bound)


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["env"]
    handlers = {"env": env, "profile": profile, "compare": compare, "generate": generate,
                "cached": cached, "time": time_step}
    try:
        handlers[command](*args)
    except Exception as err:  # one failed check must not hide the others
        emit(command, ok=False, args=args, error=f"{type(err).__name__}: {err}",
             trace=traceback.format_exc().splitlines()[-3:])
        sys.exit(1)
