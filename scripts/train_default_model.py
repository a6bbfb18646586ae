"""Train the shipped models on this CPU: a small autoregressive ZAYA1-architecture MoE, then
its conversion to diffusion by continued training with a TiDAR-style objective.

    python scripts/train_default_model.py                  # both phases (docs/default-model.md)
    python scripts/train_default_model.py --ar-steps 100 --convert-steps 100 \\
        --ar-out /tmp/ar --out /tmp/converted --log /tmp/try.csv

Phase 1 (``ar``) is next-token training: cross-entropy of each answer token (and of the
standard-library text) given everything before it, under the causal mask, plus a Switch
load-balancing term on every router. The result is an ordinary autoregressive model
(``dllm_export/data/ar-base``).

Phase 2 (``convert``) continues from it. Each training row is ``[the clean sequence | one
draft block of 16]``: the clean part keeps the causal next-token loss; the draft block is a
copy of 16 positions starting at the answer's second position (where block decoding's first
block starts) or anywhere in the answer, half the time every one of them a
mask (TiDAR's drafting: the block drafts what follows the exact prefix), otherwise each
masked with probability t ~ U(0, 1) (block diffusion, which fills a block over several
steps). The block attends to the clean prefix before its first position and to itself,
bidirectionally: the structured mask of ``runtime.attention.draft_verify_mask``. Its rows
use Dream's convention, row p predicting p + 1 (``draft_shift``), so that one rule holds for
every row of the model; the loss is the cross-entropy of the masked targets. The converted
model therefore decodes autoregressively, in blocks over the exact causal cache, and
draft-and-verify (TiDAR). It is the default model (``dllm_export/data/default-model``).

Data is made here: the task generators of ``dllm_export.eval.tasks`` (held-out problems
excluded) and the running Python's standard-library sources, read at training time.
The model is ``dllm_export.models.zaya1.Model``; checkpoints are written in the
transformers ZAYA1 layout (experts stacked) and evaluated through ``runtime.Generator`` like
any user checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sysconfig
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

# On a CPU shared with other jobs, OpenMP threads that spin while waiting for each other
# made a step 5-8x slower with 2 threads than with 1; passive waiting removes that. It must
# be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dllm_export.eval import tasks  # noqa: E402
from dllm_export.models import zaya1  # noqa: E402
from dllm_export.models.tiny import build_tokenizer, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GENERATOR_NAMES = tuple(tasks.GENERATORS)
DEFAULT_OUT = REPO / "dllm_export" / "data" / "default-model"
DEFAULT_AR_OUT = REPO / "dllm_export" / "data" / "ar-base"
DEFAULT_LOG = REPO / "docs" / "default-model-training.csv"
PHASES = ("ar", "convert", "control")  # control: convert's data, steps and lr, next-token only


@dataclass
class Recipe:
    seed: int = 0
    ar_steps: int = 1300
    convert_steps: int = 700
    batch_size: int = 64  # chat examples per task step
    text_batch_size: int = 16
    text_length: int = 96
    text_share: float = 0.1  # share of steps that train on standard-library text
    text_chars: int = 3_000_000  # how much stdlib source to read
    lr: float = 1e-3
    convert_lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    gen_length: int = 16
    block: int = 16  # draft block
    full_mask_share: float = 0.5  # draft blocks that are all masks (the rest: t ~ U(0, 1))
    # draft blocks that start where block decoding's first block does: the answer's second
    # position (its first comes from the prefill's causal row); the rest start anywhere
    inference_start_share: float = 0.5
    draft_weight: float = 1.0  # the draft loss against the next-token loss
    groups: int = 2  # task batches run as this many length-sorted parts
    vocab_size: int = 2048
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    experts: int = 8
    expert_size: int = 128
    router_hidden: int = 64
    tokenizer_examples: int = 20_000
    log_every: int = 25

    def steps(self, phase: str) -> int:
        return self.ar_steps if phase == "ar" else self.convert_steps  # convert, control


# ---------------------------------------------------------------- data


def stdlib_text(max_chars: int) -> list[str]:
    """Standard-library sources of the running Python, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


# ZAYA1's chat template without its leading BOS: the shipped models were trained on prompts
# that start at <start_of_turn> (a run trained with the BOS learned no copying in its
# budget: docs/default-model.md), and their checkpoints carry this template, so that the
# runtime renders what training saw (tests/test_default_model.py compares the ids)
CHAT_TEMPLATE = zaya1.TOKENIZER["chat_template"].removeprefix("{{ bos_token }}")
TOKENIZER_SPEC = {**zaya1.TOKENIZER, "chat_template": CHAT_TEMPLATE}


def chat_affixes() -> tuple[str, str]:
    """The text the chat template puts before and after a single user turn, rendered as
    the runtime renders it (``runtime.chat_template``)."""
    from dllm_export.runtime.chat_template import render_chat_template

    sentinel = "\x00"
    rendered = render_chat_template(CHAT_TEMPLATE, "scripts/train_default_model.py",
                                    messages=[{"role": "user", "content": sentinel}],
                                    add_generation_prompt=True)
    before, after = rendered.split(sentinel)
    return before, after


def train_tokenizer(recipe: Recipe, texts: list[str]):
    """Byte-level BPE with ZAYA1's special tokens, trained on chat-formatted task
    examples and the text.

    Digits are removed from the BPE corpus so that no merge contains a digit: every number
    is then one token per digit, which is what makes addition learnable at this size.
    """
    before, after = chat_affixes()
    mix = {task: 1.0 for task in GENERATOR_NAMES}
    examples = islice(tasks.training_examples(recipe.seed, mix), recipe.tokenizer_examples)
    corpus = [f"{before}{e.prompt}{after} {e.answer}" for e in examples] + texts
    corpus = [re.sub(r"[0-9]", "", line) for line in corpus]
    return build_tokenizer(corpus, recipe.vocab_size, zaya1.TOKENIZER)


class ChatFormat:
    """Encodes examples exactly as ``runtime.TextTokenizer.format_prompt(chat=True)`` does,
    with the template rendered once (rendering it per example costs more than a step)."""

    def __init__(self, tokenizer, special: dict):
        self.before, self.after = chat_affixes()
        self.tokenizer = tokenizer
        self.special = special

    def prompt_text(self, user: str) -> str:
        return f"{self.before}{user}{self.after}"

    def encode(self, examples, gen_length: int, length: int):
        """Returns (prompt id lists, answer id lists padded with EOS to ``length``); an
        answer with its end of turn must fit ``gen_length``."""
        prompts = self.tokenizer.encode_batch(
            [self.prompt_text(e.prompt) for e in examples], add_special_tokens=False)
        answers = self.tokenizer.encode_batch(
            [tasks.response_text(e) for e in examples], add_special_tokens=False)
        padded = []
        for answer in answers:
            ids = answer.ids + [self.special["eot"]]
            if len(ids) > gen_length:
                raise ValueError(f"an answer of {len(ids)} tokens exceeds gen_length")
            padded.append(ids + [self.special["eos"]] * (length - len(ids)))
        return [p.ids for p in prompts], padded


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 0 on left padding
    scored: torch.Tensor  # [B, L] bool: tokens the next-token loss predicts (the answer's
    # first gen_length tokens, or all text but the first token)
    first: torch.Tensor  # [B] where a draft block may start at the earliest
    last: torch.Tensor  # [B] ... and at the latest
    row_tasks: list  # task name of each row ("text" for text)


def chat_batches(chat: ChatFormat, examples, recipe: Recipe) -> list[Batch]:
    """Examples in the inference canvas layout (left-padded prompt, then the answer padded
    with EOS for ``gen_length + block`` tokens, so that a draft block starting anywhere in
    the answer has targets).

    The examples are sorted by prompt length and cut into ``groups`` equal parts, each
    padded only to its own longest prompt: the same gradient for less padding.
    """
    gen, block = recipe.gen_length, recipe.block
    prompts, answers = chat.encode(examples, gen, gen + block)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = -(-len(order) // recipe.groups)
    parts = [order[start : start + size] for start in range(0, len(order), size)]
    return [_canvas([prompts[i] for i in part], [answers[i] for i in part],
                    [examples[i].task for i in part], gen, chat.special["eos"])
            for part in parts]


def _canvas(prompts, answers, row_tasks, gen_length: int, pad_id: int) -> Batch:
    prompt_length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), prompt_length + len(answers[0])), pad_id)
    attention = torch.ones_like(ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        pad = prompt_length - len(prompt)
        attention[row, :pad] = 0
        ids[row, pad:prompt_length] = torch.tensor(prompt)
        ids[row, prompt_length:] = torch.tensor(answer)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, prompt_length : prompt_length + gen_length] = True
    rows = len(prompts)
    return Batch(ids, attention, scored, torch.full((rows,), prompt_length),
                 torch.full((rows,), prompt_length + gen_length), row_tasks)


def text_stream(tokenizer, texts: list[str], eos: int) -> torch.Tensor:
    """All texts as one token stream, documents separated by EOS."""
    stream = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    return torch.tensor(stream)


def text_batch(stream: torch.Tensor, recipe: Recipe, generator: torch.Generator):
    """Random windows of the stream: every token after the first is scored, and a draft
    block may start anywhere it has a full block of targets."""
    length = recipe.text_length
    starts = torch.randint(0, len(stream) - length, (recipe.text_batch_size,),
                           generator=generator)
    ids = torch.stack([stream[s : s + length] for s in starts.tolist()])
    ones = torch.ones_like(ids)
    scored = ones.bool()
    scored[:, 0] = False
    rows = len(ids)
    return [Batch(ids, ones, scored, torch.ones(rows, dtype=torch.long),
                  torch.full((rows,), length - recipe.block), ["text"] * rows)]


# ---------------------------------------------------------------- model and objective


def model_config(recipe: Recipe, vocab_size: int, special: dict) -> dict:
    config = zaya1.tiny_config(vocab_size, special)
    config.update({
        "hidden_size": recipe.hidden_size,
        "num_hidden_layers": recipe.layers,
        "num_attention_heads": recipe.heads,
        "num_key_value_heads": recipe.kv_heads,
        "head_dim": recipe.head_dim,
        "num_experts": recipe.experts,
        "moe_intermediate_size": recipe.expert_size,
        "router_hidden_size": recipe.router_hidden,
        "layer_types": ["hybrid"] * recipe.layers,
        "max_position_embeddings": 512,
    })
    return config


def init_weights(model, layers: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices, residual outputs scaled by 1/sqrt(2 * layers);
    biases 0; norms, residual scales and the key temperature 1."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")) and ".gate." not in name:
                param.normal_(0.0, std / math.sqrt(2 * layers))
            else:
                param.normal_(0.0, std)


class RouterProbe:
    """Collects every router's logits (E experts + skip) with forward hooks on its MLP."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [block.gate.router_mlp.register_forward_hook(self._keep)
                        for block in model.moe_blocks()]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _keep(self, module, inputs, output):
        self.logits.append(output)

    def take(self) -> list[torch.Tensor]:
        logits, self.logits = self.logits, []
        return logits


def load_balancing_loss(router_logits, real: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss C * sum_i f_i * P_i over the C = E + 1 classes
    (the skip class balanced like an expert), averaged over layers; ``real`` [B*L] picks
    the tokens that count."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits[real].float(), dim=-1)
        classes = probs.shape[-1]
        share = F.one_hot(probs.argmax(dim=-1), classes).float().mean(dim=0)
        losses.append(classes * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


class SelectedHead:
    """Makes ``Model.forward`` project to the vocabulary only at the selected rows, through
    a forward hook on the final norm: the loss reads nothing else, and at this size the
    vocabulary projection is most of the arithmetic."""

    def __init__(self, model):
        self.rows = None
        self.handle = model.model.norm.register_forward_hook(self._select)

    def remove(self):
        self.handle.remove()

    def _select(self, module, inputs, output):
        return output if self.rows is None else output[self.rows]

    def logits(self, model, rows, *args, **kwargs):
        self.rows = rows
        try:
            return model(*args, **kwargs)
        finally:
            self.rows = None


def next_token_rows(batch: Batch) -> torch.Tensor:
    """[B, L] bool: the rows whose next token is scored (row p predicts p + 1)."""
    rows = torch.zeros_like(batch.scored)
    rows[:, :-1] = batch.scored[:, 1:]
    return rows


def draft_block(batch: Batch, recipe: Recipe, mask_id: int, generator):
    """One draft block per row: (input ids [B, K], positions [B, K], masked [B, K], start
    [B]). A row's block starts at ``first + 1`` with probability ``inference_start_share``
    (block decoding's first block), else at a uniform position in [first, last]; all masks
    with probability ``full_mask_share``, else each position masked with probability
    t ~ U(0, 1) (at least one target)."""
    rows, width = batch.input_ids.shape[0], recipe.block
    span = (batch.last - batch.first + 1).float()
    start = batch.first + (torch.rand(rows, generator=generator) * span).long()
    at_inference = torch.rand(rows, generator=generator) < recipe.inference_start_share
    start = torch.where(at_inference, batch.first + 1, start)
    positions = start[:, None] + torch.arange(width)[None, :]
    clean = batch.input_ids.gather(1, positions)
    t = torch.rand(rows, 1, generator=generator)
    t = torch.where(torch.rand(rows, 1, generator=generator) < recipe.full_mask_share, 1.0, t)
    masked = torch.rand(rows, width, generator=generator) < t
    masked[:, 1:] |= ~masked[:, 1:].any(dim=1, keepdim=True) & (
        torch.arange(1, width)[None, :] == width // 2)
    return torch.where(masked, mask_id, clean), positions, masked, start


def draft_visibility(batch: Batch, start: torch.Tensor, width: int) -> torch.Tensor:
    """[B, L + K, L + K]: the clean rows causal among real tokens; the block's rows see the
    real clean tokens before their block and the whole block (draft_verify_mask's rule)."""
    rows, length = batch.input_ids.shape
    clean = zaya1.causal_visibility(batch.attention_mask, length, batch.input_ids.device)
    before = (torch.arange(length)[None, :] < start[:, None]) & batch.attention_mask.bool()
    visible = torch.zeros(rows, length + width, length + width, dtype=torch.bool)
    visible[:, :length, :length] = clean
    visible[:, length:, :length] = before[:, None, :]
    visible[:, length:, length:] = True
    return visible


def objective(model, hooks, batch: Batch, recipe: Recipe, phase: str, special: dict,
              generator):
    """Returns (loss, statistics). ``ar``: the next-token loss; ``convert``: that plus the
    draft block's masked-target loss (row p of the block predicts p + 1)."""
    probe, head = hooks
    ids, attention = batch.input_ids, batch.attention_mask
    ntp_rows = next_token_rows(batch)
    ntp_targets = ids[:, 1:][ntp_rows[:, :-1]]
    stats = {"tokens": ids.numel()}
    if phase in ("ar", "control"):
        logits = head.logits(model, ntp_rows, ids, attention)
        real = attention.reshape(-1).bool()
        ntp_logits, draft_logits = logits, None
    else:
        width = recipe.block
        block, positions, masked, start = draft_block(batch, recipe, special["mask"], generator)
        inputs = torch.cat((ids, block), dim=1)
        all_positions = torch.cat((torch.arange(ids.shape[1])[None].expand_as(ids), positions), 1)
        visible = draft_visibility(batch, start, width)
        # block row j predicts position start + j + 1: a target when that input is masked
        draft_rows = torch.zeros_like(masked)
        draft_rows[:, :-1] = masked[:, 1:]
        draft_targets = ids.gather(1, positions[:, 1:])[masked[:, 1:]]
        selected = torch.cat((ntp_rows, draft_rows), dim=1)
        logits = head.logits(model, selected, inputs, positions=all_positions, visible=visible)
        # rows come back in row-major order: split each sequence's clean and draft rows
        is_draft = torch.cat((torch.zeros_like(ntp_rows), torch.ones_like(draft_rows)), 1)
        is_draft = is_draft[selected]
        ntp_logits, draft_logits = logits[~is_draft], logits[is_draft]
        real = torch.cat((attention, torch.ones_like(block)), dim=1).reshape(-1).bool()
    ntp_loss = F.cross_entropy(ntp_logits, ntp_targets)
    loss = ntp_loss
    stats.update(_hits("ntp", ntp_logits, ntp_targets, ids[:, 1:], ntp_rows[:, :-1],
                       batch.row_tasks, special["eos"]))
    stats["ntp_loss"] = ntp_loss.item()
    if draft_logits is not None:
        draft_loss = F.cross_entropy(draft_logits, draft_targets)
        loss = loss + recipe.draft_weight * draft_loss
        stats["draft_loss"] = draft_loss.item()
        targets_full = ids.gather(1, positions[:, 1:])
        stats.update(_hits("draft", draft_logits, draft_targets, targets_full, masked[:, 1:],
                           batch.row_tasks, special["eos"]))
    aux = load_balancing_loss(probe.take(), real)
    stats["aux"] = aux.item()
    return loss + recipe.aux_coef * aux, stats


def _hits(kind: str, logits, targets, ids, where, row_tasks, eos_id: int) -> dict:
    """Top-1 hits of the scored predictions overall, and per task on the answer itself
    (EOS padding left out)."""
    hits = torch.zeros_like(where)
    hits[where] = logits.detach().argmax(dim=-1) == targets
    counts = {f"{kind}_correct": int(hits.sum()), f"{kind}_count": int(where.sum())}
    content = where & (ids != eos_id)
    row_hits, row_content = (hits & content).sum(dim=1), content.sum(dim=1)
    for row, task in enumerate(row_tasks):
        for key, value in ((f"{kind}_hit:{task}", row_hits[row]),
                           (f"{kind}_n:{task}", row_content[row])):
            counts[key] = counts.get(key, 0) + int(value)
    return counts


def lr_factor(step: int, steps: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def make_optimizer(model, recipe: Recipe, lr: float):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


# ---------------------------------------------------------------- training loop


ANSWER_TASKS = (*tasks.TASKS, "repeat")


class TrainingLog:
    """Averages task and text steps separately and keeps one row per ``every`` steps."""

    COLUMNS = ("phase", "step", "seconds", "lr", "task_ntp_loss", "task_ntp_acc",
               "task_draft_loss", "task_draft_acc", "text_ntp_loss", "text_draft_loss",
               "aux_loss", "tokens_per_s",
               *(f"{kind}_acc_{task}" for kind in ("ntp", "draft") for task in ANSWER_TASKS))
    ANSWER_TASKS = ANSWER_TASKS

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every
        self.started = self.window_started = time.perf_counter()
        self.rows: list[dict] = []
        self._reset()

    def _reset(self):
        self.sums = {"task": {}, "text": {}}

    def add(self, kind: str, stats: dict, parts: int):
        """One part of a step; losses are divided by the number of parts."""
        sums = self.sums[kind]
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + (value / parts if key.endswith(("loss", "aux"))
                                            else value)

    def end_step(self, kind: str):
        self.sums[kind]["steps"] = self.sums[kind].get("steps", 0) + 1

    def flush(self, phase: str, step: int, lr: float) -> dict:
        now = time.perf_counter()
        task, text = self.sums["task"], self.sums["text"]
        steps = task.get("steps", 0) + text.get("steps", 0)
        row = {
            "phase": phase, "step": step, "seconds": round(now - self.started, 1), "lr": lr,
            "task_ntp_loss": _ratio(task.get("ntp_loss", 0), task.get("steps", 0)),
            "task_ntp_acc": _ratio(task.get("ntp_correct", 0), task.get("ntp_count", 0)),
            "task_draft_loss": _ratio(task.get("draft_loss", 0), task.get("steps", 0)
                                      if "draft_loss" in task else 0),
            "task_draft_acc": _ratio(task.get("draft_correct", 0), task.get("draft_count", 0)),
            "text_ntp_loss": _ratio(text.get("ntp_loss", 0), text.get("steps", 0)),
            "text_draft_loss": _ratio(text.get("draft_loss", 0), text.get("steps", 0)
                                      if "draft_loss" in text else 0),
            "aux_loss": _ratio(task.get("aux", 0) + text.get("aux", 0), steps),
            "tokens_per_s": round((task.get("tokens", 0) + text.get("tokens", 0))
                                  / max(now - self.window_started, 1e-9)),
        }
        for kind in ("ntp", "draft"):
            for name in self.ANSWER_TASKS:
                row[f"{kind}_acc_{name}"] = _ratio(task.get(f"{kind}_hit:{name}", 0),
                                                   task.get(f"{kind}_n:{name}", 0))
        self.rows.append(row)
        self.window_started = now
        self._reset()
        return row

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)


def _ratio(numerator: float, denominator: float):
    return round(numerator / denominator, 4) if denominator else ""


# The task mix of the autoregressive phase, as (start, weights) with start a fraction of
# its steps (the default model's curriculum: the model first learns to read the prompt on
# "repeat", then each task joins with most of the batch while older ones are replayed).
CURRICULUM = (
    (0.00, {"repeat": 1.0}),
    (0.10, {"repeat": 0.3, "reverse": 0.7}),
    (0.20, {"repeat": 0.1, "reverse": 0.3, "recall": 0.6}),
    (0.35, {"repeat": 0.05, "reverse": 0.15, "recall": 0.2, "sort": 0.6}),
    (0.50, {"repeat": 0.05, "reverse": 0.1, "recall": 0.15, "sort": 0.2, "add": 0.5}),
)
# The conversion sees the final mix from its first step.
CONVERT_MIX = CURRICULUM[-1][1]


def task_weights(phase: str, progress: float) -> dict:
    """The task mix at ``progress`` (0 to 1) through a phase."""
    if phase in ("convert", "control"):
        return CONVERT_MIX
    current = CURRICULUM[0][1]
    for start, weights in CURRICULUM:
        if progress >= start:
            current = weights
    return current


def next_batch(phase: str, step: int, step_is_text: bool, data: dict, recipe: Recipe,
               generator):
    """("task" or "text", a list of equally sized parts of one step's batch)."""
    if step_is_text:
        return "text", text_batch(data["stream"], recipe, generator)
    weights = task_weights(phase, (step - 1) / recipe.steps(phase))
    examples = [data["examples"].draw(weights) for _ in range(recipe.batch_size)]
    return "task", chat_batches(data["chat"], examples, recipe)


def train(model, data: dict, recipe: Recipe, phase: str, log: TrainingLog) -> None:
    hooks = (RouterProbe(model), SelectedHead(model))
    steps = recipe.steps(phase)
    optimizer = make_optimizer(model, recipe, recipe.lr if phase == "ar" else recipe.convert_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, recipe))
    generator = torch.Generator().manual_seed(recipe.seed + PHASES.index(phase))
    model.train()
    for step in range(1, steps + 1):
        is_text = torch.rand(1, generator=generator).item() < recipe.text_share
        kind, parts = next_batch(phase, step, is_text, data, recipe, generator)
        optimizer.zero_grad(set_to_none=True)
        for part in parts:
            total, stats = objective(model, hooks, part, recipe, phase, data["special"],
                                     generator)
            (total / len(parts)).backward()
            log.add(kind, stats, len(parts))
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        log.end_step(kind)
        if step % recipe.log_every == 0 or step == steps:
            row = log.flush(phase, step, schedule.get_last_lr()[0])
            print(_progress_line(row, steps), flush=True)
            log.write()
    for hook in hooks:  # a phase's hooks must not outlive it (they would hold every graph)
        hook.remove()
    model.eval()


def _progress_line(row: dict, steps: int) -> str:
    def show(name):
        value = row[name]
        return f"{value:.3f}" if isinstance(value, float) else "-"

    answers = " ".join(f"{task} {show(f'ntp_acc_{task}')}/{show(f'draft_acc_{task}')}"
                       for task in TrainingLog.ANSWER_TASKS)
    return (f"{row['phase']:7s} {row['step']:5d}/{steps} {row['seconds']:7.1f}s "
            f"lr {row['lr']:.2e} | task ntp {show('task_ntp_loss')} draft "
            f"{show('task_draft_loss')} | text ntp {show('text_ntp_loss')} | aux "
            f"{show('aux_loss')} | {row['tokens_per_s']} tok/s | answer acc ntp/draft {answers}")


# ---------------------------------------------------------------- save, evaluate, plot


def generation_config(special: dict, recipe: Recipe, phase: str) -> dict:
    """The sampler defaults each checkpoint is scored with: the base decodes
    autoregressively; the converted model draft-and-verify (lossless), its block rows
    predicting the next position."""
    config = {"bos_token_id": special["bos"], "eos_token_id": special["eot"],  # the answer's end
              "mask_token_id": special["mask"], "algorithm": "tidar",
              "gen_length": recipe.gen_length, "steps": recipe.gen_length,
              "block_length": recipe.block, "temperature": 0.0,
              "tidar_sampler": "lossless" if phase == "convert" else "autoregressive"}
    if phase == "convert":
        config["draft_shift"] = True
    return config


def save(model, config: dict, tokenizer, special: dict, recipe: Recipe, phase: str,
         out: Path) -> Path:
    """fp16 safetensors plus tokenizer, config and sampler defaults."""
    return write_checkpoint(out, "zaya1", config, zaya1.stack_state(model.state_dict(),
                                                                  model.args), tokenizer,
                            generation_config(special, recipe, phase), torch.float16,
                            shards=1, overwrite=True, spec=TOKENIZER_SPEC)


def evaluate(model_dir: Path, count: int) -> dict:
    """Held-out exact-match accuracy per task with the checkpoint's own sampler defaults."""
    from dllm_export.runtime import Generator

    generator = Generator.from_checkpoint(model_dir)
    return {task: tasks.task_accuracy(generator, tasks.held_out_examples(task, count))
            for task in tasks.TASKS}


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Losses and answer-token accuracy against the step, both phases end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    offset, last, steps = 0, None, []
    for row in rows:  # one step axis over both phases
        if last is not None and row["phase"] != last["phase"]:
            offset += int(last["step"])
        steps.append(offset + int(row["step"]))
        last = row
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    curves = {"task_ntp_loss": (0, "next token, chat"), "text_ntp_loss": (0, "next token, text"),
              "task_draft_loss": (0, "draft block, chat"),
              **{f"ntp_acc_{t}": (1, f"{t}, next token") for t in tasks.TASKS},
              **{f"draft_acc_{t}": (1, f"{t}, draft") for t in tasks.TASKS}}
    for column, (panel, label) in curves.items():
        points = [(s, float(r[column])) for s, r in zip(steps, rows, strict=True) if r[column]]
        if points:
            axes[panel].plot(*zip(*points, strict=True), label=label,
                             linestyle="--" if "draft" in column else "-")
    if offset:
        for axis in axes:
            axis.axvline(offset, color="gray", linewidth=0.8)
    axes[0].set(xlabel="step (autoregressive, then conversion)", ylabel="cross-entropy",
                yscale="log", title="training loss")
    axes[1].set(xlabel="step", ylabel="top-1 accuracy on answer tokens", ylim=(0, 1),
                title="answer-token accuracy")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)


# ---------------------------------------------------------------- main


def prepare(recipe: Recipe):
    """Tokenizer, special ids, text stream, chat formatter and an initialised model."""
    texts = stdlib_text(recipe.text_chars)
    tokenizer = train_tokenizer(recipe, texts)
    spec = zaya1.TOKENIZER
    # answers end with <eos> (role eot) and are padded with <end_of_turn> (role eos)
    special = {role: tokenizer.token_to_id(spec[role]) for role in ("bos", "eos", "eot", "mask")}
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    config = model_config(recipe, vocab, special)
    torch.manual_seed(recipe.seed)
    model = zaya1.Model(zaya1.ModelArgs.from_dict(config))
    init_weights(model, recipe.layers)
    data = {
        "special": special,
        "chat": ChatFormat(tokenizer, special),
        "stream": text_stream(tokenizer, texts, special["eos"]),
        "examples": tasks.TrainingStream(recipe.seed),
    }
    return tokenizer, config, model, data


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ar-steps", type=int, default=Recipe.ar_steps)
    parser.add_argument("--convert-steps", type=int, default=Recipe.convert_steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--ar-out", type=Path, default=DEFAULT_AR_OUT,
                        help="the autoregressive base")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the converted model")
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG,
                        help="CSV log; a .json summary and a .png plot are written beside it")
    parser.add_argument("--eval-count", type=int, default=100,
                        help="held-out prompts per task (0: skip the evaluation)")
    parser.add_argument("--base", type=Path, default=None,
                        help="convert this saved autoregressive base (skips phase 1)")
    parser.add_argument("--control", action="store_true",
                        help="with --base: instead of converting, train the base on "
                        "autoregressively with the conversion's data, steps and learning "
                        "rate (the control the converted model is compared with)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override other Recipe fields, e.g. --set lr=1e-3 layers=6")
    return parser.parse_args()


def recipe_from_args(args) -> Recipe:
    recipe = Recipe(ar_steps=args.ar_steps, convert_steps=args.convert_steps, seed=args.seed)
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(recipe, name))
        setattr(recipe, name, kind(float(value)) if kind is int else kind(value))
    return recipe


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    started = time.perf_counter()
    tokenizer, config, model, data = prepare(recipe)
    if args.base is not None:
        from dllm_export.models import load_model

        base, _ = load_model(args.base)
        model.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
        base_tokens = json.loads((args.base / "tokenizer.json").read_text())
        if base_tokens["model"]["vocab"] != json.loads(tokenizer.to_str())["model"]["vocab"]:
            raise SystemExit(f"{args.base}: its tokenizer is not this recipe's")
    counts = zaya1.parameter_counts(model.args)
    print(f"vocab {config['vocab_size']}, parameters {counts['total']:,} "
          f"({counts['active']:,} active), text stream {len(data['stream']):,} tokens, "
          f"prepared in {time.perf_counter() - started:.1f}s", flush=True)
    log = TrainingLog(args.log, recipe.log_every)
    summary = {
        "command": "python scripts/train_default_model.py " + " ".join(
            [f"--ar-steps {args.ar_steps}", f"--convert-steps {args.convert_steps}",
             f"--seed {args.seed}"] + (["--set", *args.set] if args.set else [])),
        "recipe": asdict(recipe), "parameters": counts, "torch": torch.__version__,
        "threads": args.threads, "phases": {},
    }
    if args.base is not None:
        summary["command"] += f" --base {args.base}" + (" --control" if args.control else "")
    elif args.control:
        raise SystemExit("--control continues a saved base: give --base DIR")
    phases = (("ar", args.ar_out), ("convert", args.out))
    if args.control:  # the base trained on as long, autoregressively: what conversion adds
        phases = (("control", args.out),)
    for phase, out in phases:
        if phase == "ar" and args.base is not None:
            continue
        phase_started = time.perf_counter()
        train(model, data, recipe, phase, log)
        train_seconds = time.perf_counter() - phase_started
        path = save(model, config, tokenizer, data["special"], recipe, phase, out)
        accuracy = evaluate(path, args.eval_count) if args.eval_count else {}
        summary["phases"][phase] = {
            "out": str(out), "train_seconds": round(train_seconds, 1),
            "final": log.rows[-1], "held_out_accuracy": accuracy,
            "size_bytes": (path / "model.safetensors").stat().st_size}
        print(json.dumps({phase: {k: summary["phases"][phase][k] for k in (
            "train_seconds", "held_out_accuracy", "size_bytes")}}), flush=True)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["eval_count_per_task"] = args.eval_count
    args.log.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(args.log, args.log.with_suffix(".png"))


if __name__ == "__main__":
    main()
