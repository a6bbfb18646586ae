"""The app-facing API: a ``Generator`` made from an artifact, an engine or a checkpoint.

    gen = Generator.from_artifact("out/llada-onnx")
    out = gen.generate("What is 12 + 34?", chat=True, on_text=print)
    print(out.texts[0], out.tokens_per_second)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from dllm_export import families
from dllm_export.errors import DllmExportError
from dllm_export.runtime.generate import SamplerConfig, Special, StepInfo, denoise
from dllm_export.runtime.tokenizer import TextTokenizer

# generation_config.json keys that some checkpoints use for the same options
GENERATION_ALIASES = {"max_new_tokens": "gen_length"}


def sampler_defaults(family: str, generation_config: dict) -> SamplerConfig:
    """Family defaults, overridden by diffusion keys found in generation_config.json."""
    values = dict(families.family(family).sampler)
    for key, value in generation_config.items():
        key = GENERATION_ALIASES.get(key, key)
        if key in SamplerConfig.__dataclass_fields__ and key != "seed":
            values[key] = value
    return SamplerConfig(**values)


@dataclass
class GenerationOutput:
    texts: list[str]
    tokens: list[list[int]]  # generated ids per prompt, up to (not including) EOS/EoT
    forwards: int  # denoiser forward passes (NFE)
    generated_tokens: int  # answer tokens over all prompts
    seconds: float
    step_ms_median: float
    forward_ms_median: float

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def stats(self) -> dict:
        return {
            "forwards": self.forwards,
            "generated_tokens": self.generated_tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "seconds": round(self.seconds, 4),
            "step_ms_median": round(self.step_ms_median, 3),
            "forward_ms_median": round(self.forward_ms_median, 3),
        }


class Generator:
    """Prompt in, text out, over any backend; the sampler defaults come with the model."""

    def __init__(self, backend, tokenizer: TextTokenizer, special: Special,
                 defaults: SamplerConfig, family: str):
        self.backend = backend
        self.tokenizer = tokenizer
        self.special = special
        self.defaults = defaults
        self.family = family

    @classmethod
    def from_checkpoint(cls, model_dir, device: str = "cpu", dtype=None, moe: str | None = None,
                        topk: int = 8) -> "Generator":
        """The PyTorch reference backend over a checkpoint directory (imports torch)."""
        from dllm_export.checkpoint import resolve_special_tokens
        from dllm_export.models import load_model, set_moe_strategy
        from dllm_export.runtime.backends.torch_backend import TorchBackend

        model, checkpoint = load_model(model_dir, dtype=dtype)
        if moe:
            set_moe_strategy(model, moe)
        tokenizer = TextTokenizer(model_dir)
        tokens = resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                                        tokenizer, Path(model_dir))
        special = _special(tokens.as_dict())
        backend = TorchBackend(model, _special_ids(special), topk=topk, device=device)
        return cls(backend, tokenizer, special,
                   sampler_defaults(checkpoint.family, checkpoint.generation_config),
                   checkpoint.family)

    @classmethod
    def from_artifact(cls, artifact_dir, provider: str = "cpu", threads: int | None = None,
                      memory: str = "fast") -> "Generator":
        """An exported artifact on ONNX Runtime, or an engine directory on TensorRT;
        ``memory`` "lean" shares one memory-mapped copy of the weights between the
        artifact's ONNX Runtime graphs instead of a pre-packed copy per graph."""
        from dllm_export.jsonio import read_json
        from dllm_export.runtime.artifact import open_backend

        manifest_path = Path(artifact_dir) / "manifest.json"
        if manifest_path.is_file() and read_json(manifest_path, "the artifact manifest").get(
                "family") == "diffusion-gemma":  # its own graphs and sampler
            from dllm_export.runtime.diffusion_gemma import GemmaGenerator

            if memory != "fast":
                raise DllmExportError(f"--memory {memory}: not available for DiffusionGemma "
                                      "artifacts yet; use --memory fast")
            return GemmaGenerator.from_artifact(artifact_dir, provider=provider, threads=threads)
        backend, manifest = open_backend(Path(artifact_dir), provider=provider, threads=threads,
                                         memory=memory)
        special = _special(manifest["special_tokens"])
        try:
            defaults = SamplerConfig(**manifest["generation_defaults"])
        except TypeError as err:
            raise DllmExportError(f"{Path(artifact_dir) / 'manifest.json'}: field "
                                  f"generation_defaults is malformed ({err})") from None
        return cls(backend, TextTokenizer(artifact_dir), special, defaults, manifest["family"])

    def config(self, **overrides) -> SamplerConfig:
        return self.defaults.updated(**overrides)

    def encode(self, prompt, chat: bool) -> list[int]:
        return self.tokenizer.format_prompt(prompt, chat)

    def answer_tokens(self, row) -> list[int]:
        stops = {self.special.eos_id, self.special.eot_id} - {None}
        out = []
        for token in row:
            if int(token) in stops:
                break
            out.append(int(token))
        return out

    def generate(self, prompts, chat: bool = False, on_text=None, on_step=None,
                 truncate: bool = False, **overrides) -> GenerationOutput:
        """Generate for one prompt (str), chat messages (list of dicts) or a list of prompts.

        ``on_text(str)`` streams the first prompt's answer as its leading positions commit;
        ``on_step(StepInfo)`` sees every step.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        config = self.config(**overrides)
        ids = [self.encode(p, chat) for p in prompts]
        streamer = _TextStreamer(self, on_text, config.gen_length) if on_text else None

        def step_hook(info: StepInfo):
            if streamer:
                streamer(info)
            if on_step:
                on_step(info)

        result = denoise(self.backend, ids, config, self.special,
                         on_step=step_hook if (streamer or on_step) else None, truncate=truncate,
                         family=families.family(self.family))
        rows = [self.answer_tokens(r[result.prompt_length:]) for r in result.sequences]
        if streamer:
            streamer.flush(rows[0])
        return GenerationOutput(
            texts=[self.tokenizer.decode(r) for r in rows],
            tokens=rows,
            forwards=result.forwards,
            generated_tokens=sum(len(r) for r in rows),
            seconds=result.seconds,
            step_ms_median=1000 * statistics.median(result.step_seconds or [0.0]),
            forward_ms_median=1000 * statistics.median(result.forward_seconds or [0.0]),
        )


class _TextStreamer:
    """Emits the newly committed leading text of the first row after each step."""

    def __init__(self, generator: Generator, on_text, gen_length: int):
        self.generator = generator
        self.on_text = on_text
        self.gen_length = gen_length
        self.sent = ""

    def _emit(self, text: str):
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def __call__(self, info: StepInfo):
        generated = info.canvas[0, -self.gen_length:]
        masked = generated == self.generator.special.mask_id
        ready = generated[: masked.argmax()] if masked.any() else generated
        self._emit(self.generator.tokenizer.decode(self.generator.answer_tokens(ready)))

    def flush(self, final_tokens):
        self._emit(self.generator.tokenizer.decode(final_tokens))


def _special(tokens: dict) -> Special:
    if tokens.get("mask_id") is None:
        raise DllmExportError("manifest.json: special_tokens.mask_id is missing")
    pad = tokens.get("pad_id")
    if pad is None or pad == tokens["mask_id"]:  # padding with the mask id would be generated
        pad = tokens["eos_id"]
    return Special(mask_id=tokens["mask_id"], eos_id=tokens["eos_id"], eot_id=tokens.get("eot_id"),
                   pad_id=pad)


def _special_ids(special: Special) -> tuple[int, ...]:
    return tuple(t for t in (special.eos_id, special.eot_id) if t is not None)
