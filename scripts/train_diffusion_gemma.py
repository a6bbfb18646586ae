"""Train the shipped tiny DiffusionGemma (``dllm_export/data/diffusion-gemma-tasks``) on the
built-in tasks, in the published checkpoint layout, so that quantisation, the gate and the
sampler are judged on a model whose predictions mean something (a random one predicts
every token with about the same probability: its argmax is noise).

The architecture is make-tiny's (models/diffusion_gemma.tiny_config: sliding and full
layers, the shared key/value projection, 8 experts top-2 with their router, soft-capping,
the self-conditioning module), a little wider. The objective is block diffusion as its
sampler decodes: the encoder writes the prompt's keys and values causally, then the
decoder sees the answer's canvas (the answer, <eos>, padding to ``canvas_length``) with
each token replaced by a uniformly random one with probability t ~ U(0, 1), and is trained
with cross-entropy on every canvas position. Half the batches first run the decoder once
without gradient and feed its logits, divided by a temperature drawn from the sampler's
[t_min, t_max], back as the self-conditioning signal, as the sampler does from its second
step on. Prompts are rendered with the runtime's own chat template code.

    python scripts/train_diffusion_gemma.py --out dllm_export/data/diffusion-gemma-tasks

Prints progress and a JSON summary (seed, steps, loss, seconds, held-out accuracy on
PyTorch with the sampler's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dllm_export.eval import tasks  # noqa: E402
from dllm_export.models import diffusion_gemma as dg  # noqa: E402
from dllm_export.models.layers import KVCache  # noqa: E402
from dllm_export.models.tiny import build_tokenizer, write_checkpoint, write_tokenizer  # noqa: E402
from dllm_export.runtime.tokenizer import TextTokenizer  # noqa: E402

VOCAB = 384
WIDER = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32,
         "moe_intermediate_size": 64}


def tokenizer_and_format(work: Path):
    """The BPE tokenizer trained on task text and a prompt formatter (the runtime's)."""
    stream = tasks.training_examples(seed=0)
    corpus = [f"{e.prompt}{tasks.response_text(e)}" for e in islice(stream, 4000)]
    tokenizer = build_tokenizer(corpus, VOCAB, dg.TOKENIZER)
    write_tokenizer(work, tokenizer, dg.TOKENIZER, 4096)
    return tokenizer, TextTokenizer(work)


def model_config(tokenizer) -> dict:
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    special = {role: tokenizer.token_to_id(dg.TOKENIZER[role]) for role in ("bos", "eos")}
    config = dg.tiny_config(vocab, special)
    text = config["text_config"]
    text.update(WIDER)
    for layer in text["per_layer_config"].values():
        layer["head_dim"] = 2 * WIDER["head_dim"]
    return config


def encode_example(example, format_prompt, tokenizer, canvas: int, eos: int):
    prompt = format_prompt(example.prompt)
    answer = tokenizer.encode(tasks.response_text(example)).ids + [eos]
    if len(answer) > canvas:
        return None
    return prompt, answer + [eos] * (canvas - len(answer))


def make_batch(stream, size, format_prompt, tokenizer, canvas, eos):
    rows = []
    while len(rows) < size:
        row = encode_example(next(stream), format_prompt, tokenizer, canvas, eos)
        if row is not None:
            rows.append(row)
    length = max(len(p) for p, _ in rows)
    prompts = torch.full((size, length), eos, dtype=torch.long)
    lengths = torch.tensor([len(p) for p, _ in rows])
    for i, (p, _) in enumerate(rows):
        prompts[i, :len(p)] = torch.tensor(p)
    return prompts, lengths, torch.tensor([a for _, a in rows])


def denoise_loss(model, prompts, lengths, targets, generator, self_condition: bool,
                 t_range=(0.4, 0.8)):
    batch, length = prompts.shape
    canvas = targets.shape[1]
    vocab = model.args.vocab_size
    positions = torch.arange(length)[None].expand(batch, -1)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None].expand(batch, -1, -1)
    cache = KVCache(None)
    model.encode(prompts, positions, causal, cache)
    past = [tuple(t for t in layer) for layer in cache.presents]
    t = torch.rand(batch, 1, generator=generator)
    noisy = torch.where(torch.rand(batch, canvas, generator=generator) < t,
                        torch.randint(0, vocab, (batch, canvas), generator=generator), targets)
    canvas_positions = lengths[:, None] + torch.arange(canvas)[None]
    prompt_keys = torch.arange(length)[None, None, :] < lengths[:, None, None]
    visible = torch.cat((prompt_keys.expand(batch, canvas, length),
                         torch.ones(batch, canvas, canvas, dtype=torch.bool)), dim=2)
    previous = None
    if self_condition:
        with torch.no_grad():
            first = model.denoise(noisy, canvas_positions, visible, KVCache(past))
        low, high = t_range
        temperature = low + (high - low) * torch.rand(batch, 1, 1, generator=generator)
        previous = first / temperature
    logits = model.denoise(noisy, canvas_positions, visible, KVCache(past), previous_logits=previous)
    return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))


def state_dict_in_checkpoint_names(model, config: dict) -> dict:
    """The model's parameters under the checkpoint's names (``router.*``, stacked experts),
    plus the vision tower's stored tensors (zeros: this family never reads them)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = dg.stack_state(state, model.args)
    for name, shape in dg.unused_shapes(config, model.args).items():
        out[name] = torch.zeros(shape)
    return out


def held_out_accuracy(model_dir: Path, count: int) -> dict:
    """Task accuracy on PyTorch with the sampler's defaults (TorchSteps, seeded noise)."""
    from dllm_export.models import load_model
    from dllm_export.runtime.diffusion_gemma import (
        GemmaSamplerConfig,
        NumpyNoise,
        TorchSteps,
        gemma_defaults,
        generate,
    )

    model, checkpoint = load_model(model_dir, dtype=torch.float32)
    text = TextTokenizer(model_dir)
    defaults = gemma_defaults(checkpoint.generation_config)
    config = GemmaSamplerConfig(**{**defaults, "max_new_tokens": model.args.canvas_length})
    eos = checkpoint.generation_config["eos_token_id"]
    scores = {}
    for task in tasks.TASKS:
        right = 0
        for i, example in enumerate(tasks.held_out_examples(task, count)):
            ids = np.asarray([text.format_prompt(example.prompt, True)])
            result = generate(TorchSteps(model), ids, config, NumpyNoise(model.args.vocab_size, i),
                              [eos], eos)
            row = result.sequences[0, ids.shape[1]:].tolist()
            row = row[:row.index(eos)] if eos in row else row
            right += tasks.score(text.decode(row), example)
        scores[task] = right / count
    scores["mean"] = sum(scores[t] for t in tasks.TASKS) / len(tasks.TASKS)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=25, help="held-out problems per task")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads (one is fastest for a model this small)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, text = tokenizer_and_format(Path(scratch))
        config = model_config(tokenizer)
        model_args = dg.ModelArgs.from_dict(config)
        model = dg.Model(model_args)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
        eos = tokenizer.token_to_id(dg.TOKENIZER["eos"])
        canvas = model_args.canvas_length
        stream = tasks.training_examples(seed=args.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                      betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * s / args.steps)))
        smoothed = None
        for step in range(args.steps):
            prompts, lengths, targets = make_batch(
                stream, args.batch, lambda p: text.format_prompt(p, True), tokenizer, canvas, eos)
            loss = denoise_loss(model, prompts, lengths, targets, generator,
                                self_condition=bool(step % 2))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step}/{args.steps} loss {smoothed:.3f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        generation = dg.tiny_generation({"bos": tokenizer.token_to_id(dg.TOKENIZER["bos"]),
                                         "eos": eos})
        write_checkpoint(args.out, "diffusion-gemma", config,
                         state_dict_in_checkpoint_names(model, config), tokenizer, generation,
                         torch.float16, shards=1, overwrite=args.overwrite)
    seconds = time.perf_counter() - started
    accuracy = held_out_accuracy(args.out, args.eval)
    print(json.dumps({"out": str(args.out), "seed": args.seed, "steps": args.steps,
                      "batch": args.batch, "lr": args.lr, "final_loss": round(smoothed, 4),
                      "train_seconds": round(seconds, 1), "held_out_accuracy": accuracy}))


if __name__ == "__main__":
    main()
