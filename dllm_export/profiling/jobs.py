"""One measurement job: open a backend, measure, return plain numbers.

A job is a JSON-able dict, so that ``profile`` can run each one in a fresh process
(``python -m dllm_export.profiling.jobs``, the default: backends then never share a machine's
threads with another backend's idle pool, and memory peaks belong to one measurement) or in
the calling process (tests). Kinds:

* ``diffusion``: whole generations on ``backend`` (torch / onnxruntime / tensorrt), then,
  when asked, task accuracy with the same settings and (PyTorch, MoE) the experts really hit;
* ``autoregressive``: greedy decoding of the same backbone with its key/value cache (the
  causal mode of the same forward: the checkpoint in PyTorch, or the artifact's own
  prefill and decode graphs on ONNX Runtime);
* ``experts``: the routed experts a PyTorch run of the checkpoint hits (untimed).

In a child process, progress goes to stderr as ``@progress done total`` lines and the
result is the last line on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys

from dllm_export.errors import DllmExportError

PROGRESS_MARK = "@progress"
TORCH_DTYPES = ("fp32", "fp16", "bf16")


def _torch_threads(threads):
    import torch

    if threads:
        torch.set_num_threads(threads)


def open_generator(job: dict):
    from dllm_export.runtime import Generator

    if job["backend"] == "torch":
        import torch

        _torch_threads(job.get("threads"))
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            job.get("dtype", "fp32")
        ]
        generator = Generator.from_checkpoint(
            job["path"], device=job.get("device", "cpu"), dtype=dtype
        )
        if job.get("seq_len"):  # a fixed canvas, as an exported artifact has
            generator.backend.seq_len = job["seq_len"]
        return generator
    provider = (
        "tensorrt" if job["backend"] == "tensorrt" else job.get("provider", "cpu")
    )
    return Generator.from_artifact(
        job["path"], provider=provider, threads=job.get("threads")
    )


def _diffusion(job: dict, progress) -> dict:
    from dllm_export.profiling.measure import measure_diffusion
    from dllm_export.profiling.stats import DeviceMemory
    from dllm_export.runtime.generate import SamplerConfig

    memory = DeviceMemory(
        job["backend"], job.get("device", "cpu"), job.get("provider", "cpu")
    )
    memory.start()  # before the backend opens: TensorRT allocates its memory then
    generator = open_generator(job)
    config = SamplerConfig(**job["sampler"])
    prompts = [generator.encode(p, job.get("chat", True)) for p in job["prompts"]]
    result = {
        "measured": measure_diffusion(
            generator,
            prompts,
            config,
            job["warmup"],
            job["runs"],
            progress=lambda d, t: progress("timing", d, t),
            memory=memory,
        )
    }
    if job.get("quality_examples"):
        from dllm_export.profiling.quality import task_quality

        result["quality"] = task_quality(
            generator,
            config,
            job["quality_examples"],
            progress=lambda d, t: progress("quality", d, t),
        )
    if job.get("count_experts") and job["backend"] == "torch":
        from dllm_export.profiling.experts import count_experts

        result["experts_hit"] = count_experts(
            generator, job["family"], prompts[0], config, config.gen_length
        )
    generator.backend.close()
    return result


class _Decoder:
    """Greedy decoding through a generator's backend: the causal mode of its graphs."""

    def __init__(self, generator):
        from dllm_export import families

        self.generator = generator
        self.positions = families.family(generator.family).positions

    def decode(self, prompt, new_tokens):
        from dllm_export.runtime.autoregressive import greedy_decode

        return greedy_decode(self.generator.backend, prompt, new_tokens,
                             self.generator.special.pad_id, self.positions)


def _autoregressive(job: dict, progress) -> dict:
    from dllm_export.profiling.measure import measure_autoregressive

    generator = open_generator({**job, "seq_len": None})
    prompts = [generator.encode(p, job.get("chat", True)) for p in job["prompts"]]
    measured = measure_autoregressive(
        _Decoder(generator),
        prompts,
        job["new_tokens"],
        job["warmup"],
        job["runs"],
        progress=lambda d, t: progress("timing", d, t),
    )
    generator.backend.close()
    return {"measured": measured}


def _experts(job: dict, progress) -> dict:
    """The experts a PyTorch run of the same checkpoint hits (for ONNX Runtime targets)."""
    from dllm_export.profiling.experts import count_experts
    from dllm_export.runtime.generate import SamplerConfig

    generator = open_generator({**job, "backend": "torch"})
    config = SamplerConfig(**job["sampler"])
    prompt = generator.encode(job["prompts"][0], job.get("chat", True))
    return {
        "experts_hit": count_experts(
            generator, job["family"], prompt, config, config.gen_length
        )
    }


KINDS = {
    "diffusion": _diffusion,
    "autoregressive": _autoregressive,
    "experts": _experts,
}


def run_job(job: dict, progress=None) -> dict:
    """Run one job here; ``progress(stage, done, total)`` is called as it goes."""
    progress = progress or (lambda stage, done, total: None)
    if job["kind"] not in KINDS:
        raise DllmExportError(f"unknown measurement job {job['kind']!r}")
    return KINDS[job["kind"]](job, progress)


def run_isolated(job: dict, progress=None) -> dict:
    """Run one job in a fresh Python process and return its result."""
    progress = progress or (lambda stage, done, total: None)
    child = subprocess.Popen(
        [sys.executable, "-m", "dllm_export.profiling.jobs"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdin.write(json.dumps(job))
    child.stdin.close()
    errors = []
    for line in child.stderr:
        if line.startswith(PROGRESS_MARK):
            _, stage, done, total = line.split()
            progress(stage, int(done), int(total))
        else:
            errors.append(line)
    output = child.stdout.read()
    if child.wait() != 0:
        lines = output.strip().splitlines()
        if lines and lines[-1].startswith('{"error"'):
            raise DllmExportError(json.loads(lines[-1])["error"])
        raise RuntimeError(
            f"measurement job {job['kind']} failed:\n{''.join(errors)[-3000:]}"
        )
    return json.loads(output.strip().splitlines()[-1])


def main():
    job = json.loads(sys.stdin.read())

    def progress(stage, done, total):
        print(f"{PROGRESS_MARK} {stage} {done} {total}", file=sys.stderr, flush=True)

    try:
        result = run_job(job, progress)
    except DllmExportError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
