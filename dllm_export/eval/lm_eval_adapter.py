"""An lm-evaluation-harness model (``dllm_export``) over a checkpoint or an artifact.

    python -m dllm_export.eval.lm_eval_adapter run --model dllm_export \\
        --model_args path=out/llada-onnx,mc_num=128 --tasks gsm8k --include_path my_tasks

or ``lm_eval.simple_evaluate(model=DllmExportLM(path=...), tasks=[...])``. Importing this
module registers the model; nothing else in the package imports lm_eval.

- ``loglikelihood``: the Monte-Carlo ELBO of ``likelihood.py`` (LLaDA's estimator;
  ``mc_num=128`` for multi-token answers, 1 for single-token ones such as MMLU), on the
  context + continuation tokenised as lm-eval does (trailing context spaces move to the
  continuation). ``check_greedy=true`` also reports whether greedy unmasking, one most
  confident token per step, reproduces the continuation (LLaDA's
  ``suffix_greedy_prediction``); otherwise that flag is False.
- ``generate_until``: the runtime's sampler with the model's defaults and any
  SamplerConfig field given in model_args (``gen_length=256,steps=256,block_length=32``);
  the output is cut at the first stop string. lm-eval's ``max_gen_toks`` is not used: the
  canvas is fixed by ``gen_length``.
- ``loglikelihood_rolling`` (perplexity tasks) is not defined for masked diffusion.

Model args: ``path`` (required), ``mc_num`` (128), ``mc_batch`` (16), ``batch_size``
(rows per forward), ``check_greedy`` (false), ``seed`` (1234), ``provider``, ``threads``,
and SamplerConfig fields.
"""

from __future__ import annotations

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.eval.canvas import (
    ScoredSequence,
    canvas_length,
    pack,
    region_positions,
)
from dllm_export.eval.likelihood import check_mc, elbo
from dllm_export.eval.models import EvalModel
from dllm_export.runtime.generate import SamplerConfig

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter is optional; the harness itself does not need lm_eval
    raise DllmExportError(
        "lm-eval is not installed; pip install 'dllm-export[eval]' (or lm-eval)") from None

IGNORED_ARGS = ("device", "max_batch_size", "dtype", "trust_remote_code")


@register_model("dllm_export")
class DllmExportLM(LM):
    def __init__(self, path: str, mc_num: int = 128, mc_batch: int = 16,
                 batch_size: int | str | None = None, check_greedy: bool = False,
                 seed: int = 1234, provider: str = "cpu", threads: int | None = None,
                 **options):
        super().__init__()
        sampler = {k: v for k, v in options.items() if k in SamplerConfig.__dataclass_fields__}
        unknown = set(options) - set(sampler) - set(IGNORED_ARGS)
        if unknown:
            raise DllmExportError(
                f"model_args {', '.join(sorted(unknown))}: not an option of dllm_export "
                "(path, mc_num, mc_batch, batch_size, check_greedy, seed, provider, threads, "
                "or a SamplerConfig field)")
        self.model = EvalModel.open(path, provider=provider, threads=threads)
        # lm-eval passes "auto" or a number; "auto" means the backend's own choice.
        self.model.use_batch(int(batch_size) if str(batch_size).isdigit() else None)
        self.mc_num = int(mc_num)
        self.mc_batch = check_mc(self.mc_num, int(mc_batch))
        self.check_greedy = bool(check_greedy)
        self.seed = int(seed)
        self.config = self.model.generator.config(**sampler)
        self.path = str(path)

    # ------------------------------------------------------------------ likelihood

    def _pair(self, context: str, continuation: str) -> ScoredSequence:
        """Tokens as lm-eval's causal models split them, the context cut from the left
        where a fixed canvas cannot hold both."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tokenizer = self.model.tokenizer
        whole = tokenizer.encode(context + continuation)
        prompt = tokenizer.encode(context) if context else []
        target = whole[len(prompt):]
        limit = self.model.info.seq_len
        if limit is not None:
            if len(target) >= limit:
                raise DllmExportError(
                    f"a continuation of {len(target)} tokens does not fit the canvas of "
                    f"{limit}; re-export with a larger --seq-len")
            prompt = prompt[max(0, len(prompt) + len(target) - limit):]
        return ScoredSequence(tuple(prompt), tuple(target))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        sequences = [self._pair(*request.args) for request in requests]
        values = elbo([self.model], sequences, self.mc_num, self.mc_batch, self.seed,
                      self.model.info.seq_len)[0]
        results = []
        for request, sequence, value in zip(requests, sequences, values, strict=True):
            result = (float(value), self.check_greedy and self._greedy(sequence))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def _greedy(self, sequence: ScoredSequence) -> bool:
        """Unmask the continuation one token per step, most confident first."""
        length = canvas_length([sequence], self.model.info.seq_len)
        ids, attention = pack([sequence], length, self.model.special.pad_id)
        canvas = ids.copy()
        positions, _ = region_positions(sequence, length)  # no tail here
        canvas[0, positions] = self.model.special.mask_id
        for _ in positions:
            pred = self.model.generator.backend.predict(canvas, attention)
            masked = np.flatnonzero(canvas[0] == self.model.special.mask_id)
            best = masked[np.argmax(pred.topk_logprobs[0, masked, 0])]
            canvas[0, best] = pred.topk_ids[0, best, 0]
        return bool((canvas == ids).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "dllm_export: loglikelihood_rolling (perplexity tasks such as wikitext) needs "
            "left-to-right token likelihoods, which a masked-diffusion model does not "
            "define; use loglikelihood (multiple-choice) or generate_until tasks")

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False):
        generator = self.model.generator_for(self.config, None)
        outputs = []
        batch = self.model.batch
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            out = generator.generate([r.args[0] for r in chunk], truncate=True)
            for request, text in zip(chunk, out.texts, strict=True):
                until = request.args[1].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                self.cache_hook.add_partial("generate_until", request.args, text)
                outputs.append(text)
        return outputs

    # ------------------------------------------------------------------ chat

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(chat_history, add_generation_prompt)


def main() -> None:
    """lm-eval's command line with the ``dllm_export`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
