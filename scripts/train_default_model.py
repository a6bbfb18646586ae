"""Train the shipped default model: a small LLaDA-MoE masked-diffusion model, on this CPU.

    python scripts/train_default_model.py            # the recipe in docs/default-model.md
    python scripts/train_default_model.py --steps 200 --out /tmp/try --log /tmp/try.csv

Objective (LLaDA): per sequence mask k ~ U{1..n} of its n maskable tokens, cross-entropy on
the masked tokens weighted n/k, normalised by the number of maskable tokens. Chat examples mask only the answer (padded with EOS to ``gen_length``,
so the model learns where to stop); plain text masks anything, and 1% of text batches are cut
to a random length. Plus the Switch load-balancing term on every MoE router.

Data is made here: the task generators of ``dllm_export.eval.tasks`` (held-out problems
excluded) and the running Python's standard-library sources, read at training time.
The model is ``dllm_export.models.llada_moe.Model``; the checkpoint is written with
``models.tiny.write_checkpoint`` in the LLaDA-MoE format and evaluated through
``runtime.Generator`` like any user checkpoint.
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
from dllm_export.models import llada_moe  # noqa: E402
from dllm_export.models.tiny import build_tokenizer, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GENERATOR_NAMES = tuple(tasks.GENERATORS)
DEFAULT_OUT = REPO / "dllm_export" / "data" / "default-model"
DEFAULT_LOG = REPO / "docs" / "default-model-training.csv"


@dataclass
class Recipe:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 64  # chat examples per task step
    text_batch_size: int = 16
    text_length: int = 96
    text_share: float = 0.1  # share of steps that train on standard-library text
    text_chars: int = 3_000_000  # how much stdlib source to read
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    random_length_share: float = 0.01
    aux_coef: float = 0.01
    gen_length: int = 16
    groups: int = 2  # task batches run as this many length-sorted parts
    vocab_size: int = 2048
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_size: int = 112
    tokenizer_examples: int = 20_000
    log_every: int = 25


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


def chat_affixes() -> tuple[str, str]:
    """The text LLaDA-MoE's chat template puts before and after a single user turn."""
    import jinja2

    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        llada_moe.TOKENIZER["chat_template"])
    sentinel = "\x00"
    rendered = template.render(messages=[{"role": "user", "content": sentinel}],
                               add_generation_prompt=True)
    before, after = rendered.split(sentinel)
    return before, after


# The task mix over training, as (start, weights) with start a fraction of the steps.
# Measured (hidden 128, 300 steps): copying alone reaches 47% answer-token accuracy, while
# copying mixed from the start with reverse and recall stays at 21%, and none of the three
# learns. So the model first learns to read the prompt on "repeat" (a training-only task),
# then each task joins with most of the batch while older ones are replayed.
CURRICULUM = (
    (0.00, {"repeat": 1.0}),
    (0.12, {"repeat": 0.3, "reverse": 0.7}),
    (0.25, {"repeat": 0.1, "reverse": 0.3, "recall": 0.6}),
    (0.40, {"repeat": 0.05, "reverse": 0.15, "recall": 0.2, "sort": 0.6}),
    (0.55, {"repeat": 0.05, "reverse": 0.1, "recall": 0.15, "sort": 0.2, "add": 0.5}),
)


def task_weights(progress: float) -> dict:
    """The curriculum's task mix at ``progress`` (0 to 1) through training."""
    current = CURRICULUM[0][1]
    for start, weights in CURRICULUM:
        if progress >= start:
            current = weights
    return current


def train_tokenizer(recipe: Recipe, texts: list[str]):
    """Byte-level BPE with LLaDA-MoE's special tokens, trained on chat-formatted task
    examples and the text.

    Digits are removed from the BPE corpus so that no merge contains a digit: every number
    is then one token per digit, which is what makes addition learnable at this size.
    """
    before, after = chat_affixes()
    mix = {task: 1.0 for task in GENERATOR_NAMES}
    examples = islice(tasks.training_examples(recipe.seed, mix), recipe.tokenizer_examples)
    corpus = [f"{before}{e.prompt}{after} {e.answer}" for e in examples] + texts
    corpus = [re.sub(r"[0-9]", "", line) for line in corpus]
    return build_tokenizer(corpus, recipe.vocab_size, llada_moe.TOKENIZER)


class ChatFormat:
    """Encodes examples exactly as ``runtime.TextTokenizer.format_prompt(chat=True)`` does,
    with the template rendered once (rendering it per example costs more than a step)."""

    def __init__(self, tokenizer, special: dict):
        self.before, self.after = chat_affixes()
        self.tokenizer = tokenizer
        self.special = special

    def prompt_text(self, user: str) -> str:
        return f"{self.before}{user}{self.after}"

    def encode(self, examples, gen_length: int):
        """Returns (prompt id lists, answer id lists padded with EOS to gen_length)."""
        prompts = self.tokenizer.encode_batch(
            [self.prompt_text(e.prompt) for e in examples], add_special_tokens=False)
        answers = self.tokenizer.encode_batch(
            [tasks.response_text(e) for e in examples], add_special_tokens=False)
        padded = []
        for answer in answers:
            ids = answer.ids + [self.special["eot"]]
            if len(ids) > gen_length:
                raise ValueError(f"an answer of {len(ids)} tokens exceeds gen_length")
            padded.append(ids + [self.special["eos"]] * (gen_length - len(ids)))
        return [p.ids for p in prompts], padded


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 0 on left padding
    maskable: torch.Tensor  # [B, L] bool: the answer region, or everything for text
    row_tasks: list  # task name of each row ("text" for text)


def chat_batches(chat: ChatFormat, examples, gen_length: int, groups: int) -> list[Batch]:
    """Examples in the inference canvas layout (left-padded prompt, then the answer).

    The examples are sorted by prompt length and cut into ``groups`` equal parts, each
    padded only to its own longest prompt: the same gradient for less padding.
    """
    prompts, answers = chat.encode(examples, gen_length)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = -(-len(order) // groups)
    parts = [order[start : start + size] for start in range(0, len(order), size)]
    return [_canvas([prompts[i] for i in part], [answers[i] for i in part],
                    [examples[i].task for i in part], gen_length, chat.special["eos"])
            for part in parts]


def _canvas(prompts, answers, row_tasks, gen_length: int, pad_id: int) -> Batch:
    prompt_length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), prompt_length + gen_length), pad_id)
    attention = torch.ones_like(ids)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=False)):
        pad = prompt_length - len(prompt)
        attention[row, :pad] = 0
        ids[row, pad:prompt_length] = torch.tensor(prompt)
        ids[row, prompt_length:] = torch.tensor(answer)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, prompt_length:] = True
    return Batch(ids, attention, maskable, row_tasks)


def text_stream(tokenizer, texts: list[str], eos: int) -> torch.Tensor:
    """All texts as one token stream, documents separated by EOS."""
    stream = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    return torch.tensor(stream)


def text_batch(stream: torch.Tensor, recipe: Recipe, generator: torch.Generator):
    """Random windows of the stream; 1% of batches are cut to a random length (LLaDA)."""
    length = recipe.text_length
    if torch.rand(1, generator=generator).item() < recipe.random_length_share:
        length = int(torch.randint(1, length + 1, (1,), generator=generator))
    starts = torch.randint(0, len(stream) - length, (recipe.text_batch_size,),
                           generator=generator)
    ids = torch.stack([stream[s : s + length] for s in starts.tolist()])
    ones = torch.ones_like(ids)
    return [Batch(ids, ones, ones.bool(), ["text"] * len(ids))]


# ---------------------------------------------------------------- model and objective


def model_config(recipe: Recipe, vocab_size: int, special: dict) -> dict:
    config = llada_moe.tiny_config(vocab_size, special)
    config.update({
        "hidden_size": recipe.hidden_size,
        "num_hidden_layers": recipe.layers,
        "num_attention_heads": recipe.heads,
        "num_key_value_heads": recipe.heads,
        "num_experts": recipe.experts,
        "num_experts_per_tok": recipe.top_k,
        "expert_intermediate_size": recipe.expert_size,
        "dense_intermediate_size": 4 * recipe.hidden_size,  # unused: every layer is MoE
        "moe_layer_freq": [1] * recipe.layers,
        "router_aux_loss_coef": recipe.aux_coef,
        "max_position_embeddings": 512,
    })
    return config


def init_weights(model, layers: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices, residual outputs scaled by 1/sqrt(2 * layers)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, std / math.sqrt(2 * layers))
            else:
                param.normal_(0.0, std)


class RouterProbe:
    """Collects every MoE router's logits with forward hooks on ``mlp.gate``, leaving the
    model's own forward untouched."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [block.gate.register_forward_hook(self._keep)
                        for block in model.moe_blocks()]

    def _keep(self, module, inputs, output):
        self.logits.append(output)

    def take(self) -> list[torch.Tensor]:
        logits, self.logits = self.logits, []
        return logits


def load_balancing_loss(router_logits, top_k: int, real: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_i f_i * P_i, averaged over layers.

    f_i: share of the top-k assignments that go to expert i; P_i: mean router probability.
    ``real`` [B*L] bool picks the tokens that count (padding is left out).
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits[real].float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts = F.one_hot(chosen, num_experts).sum(dim=(0, 1)).float()
        share = counts / counts.sum()
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def forward_process(ids, maskable, mask_id: int, generator: torch.Generator):
    """Mask exactly k ~ U{1..n} of each row's n maskable tokens; each masked token's loss is
    weighted n/k.

    This is the low-variance form of LLaDA's objective (the estimator LLaDA itself uses for
    likelihoods): the same expected loss as masking each token with probability t ~ U(0, 1)
    and weighting by 1/t, without the rows where t is tiny and the weight 1/t explodes. With
    16-token answers and batches of 64, the Bernoulli form learned copying half as fast.
    """
    batch, length = ids.shape
    n = maskable.sum(dim=1)
    k = (torch.rand(batch, generator=generator) * n).floor().long() + 1
    scores = torch.rand(batch, length, generator=generator).masked_fill(~maskable, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    masked = (rank < k[:, None]) & maskable
    p_mask = (k.float() / n.clamp(min=1).float())[:, None].expand(batch, length)
    return torch.where(masked, mask_id, ids), masked, p_mask


class MaskedHead:
    """Makes ``Model.forward`` project to the vocabulary only at the masked positions,
    through a forward hook on the final norm, so that its logits come back as [N, V] in
    ``tensor[masked]`` order. The loss reads nothing else, and at this size the vocabulary
    projection is most of the model's arithmetic."""

    def __init__(self, model):
        self.positions = None
        model.model.norm.register_forward_hook(self._select)

    def _select(self, module, inputs, output):
        return output if self.positions is None else output[self.positions]

    def logits(self, model, input_ids, attention_mask, positions):
        self.positions = positions
        try:
            return model(input_ids, attention_mask)
        finally:
            self.positions = None


def diffusion_loss(model, hooks, batch: Batch, recipe: Recipe, special: dict, generator):
    """Returns (loss + aux_coef * aux, statistics of the masked predictions).

    ``hooks`` is (RouterProbe, MaskedHead) on ``model``.
    """
    probe, head = hooks
    ids, attention = batch.input_ids, batch.attention_mask
    noisy, masked, p_mask = forward_process(ids, batch.maskable, special["mask"], generator)
    logits = head.logits(model, noisy, attention, masked)  # [masked count, V]
    targets = ids[masked]
    token_loss = F.cross_entropy(logits, targets, reduction="none") / p_mask[masked]
    # LLaDA divides by the maskable length (answer incl. EOS padding, or the whole text).
    loss = token_loss.sum() / batch.maskable.sum().clamp(min=1)
    aux = load_balancing_loss(probe.take(), recipe.top_k, attention.reshape(-1).bool())
    hits = torch.zeros_like(masked)
    hits[masked] = logits.detach().argmax(dim=-1) == targets
    stats = {"loss": loss.item(), "aux": aux.item(), "tokens": ids.numel()}
    stats.update(_hit_counts(hits, ids, masked, batch.row_tasks, special["eos"]))
    return loss + recipe.aux_coef * aux, stats


def _hit_counts(hits, ids, masked, row_tasks, eos_id: int) -> dict:
    """Masked-token hits overall, and per task on the answer itself (EOS padding left out)."""
    counts = {"correct": int(hits.sum()), "masked": int(masked.sum())}
    content = masked & (ids != eos_id)
    row_hits, row_content = (hits & content).sum(dim=1), content.sum(dim=1)
    for row, task in enumerate(row_tasks):
        for key, value in ((f"hit:{task}", row_hits[row]), (f"n:{task}", row_content[row])):
            counts[key] = counts.get(key, 0) + int(value)
    return counts


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def make_optimizer(model, recipe: Recipe):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8)


# ---------------------------------------------------------------- training loop


class TrainingLog:
    """Averages task and text steps separately and keeps one row per ``every`` steps."""

    ANSWER_TASKS = (*tasks.TASKS, "repeat")
    COLUMNS = ("step", "seconds", "lr", "task_loss", "task_masked_acc", "text_loss",
               "text_masked_acc", "aux_loss", "tokens_per_s",
               *(f"answer_acc_{task}" for task in ANSWER_TASKS))

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
            sums[key] = sums.get(key, 0) + (value / parts if key in ("loss", "aux") else value)

    def end_step(self, kind: str):
        self.sums[kind]["steps"] = self.sums[kind].get("steps", 0) + 1

    def flush(self, step: int, lr: float) -> dict:
        now = time.perf_counter()
        task, text = self.sums["task"], self.sums["text"]

        def total(key):
            return task.get(key, 0) + text.get(key, 0)

        row = {
            "step": step, "seconds": round(now - self.started, 1), "lr": lr,
            "task_loss": _ratio(task.get("loss", 0), task.get("steps", 0)),
            "task_masked_acc": _ratio(task.get("correct", 0), task.get("masked", 0)),
            "text_loss": _ratio(text.get("loss", 0), text.get("steps", 0)),
            "text_masked_acc": _ratio(text.get("correct", 0), text.get("masked", 0)),
            "aux_loss": _ratio(total("aux"), total("steps")),
            "tokens_per_s": round(total("tokens") / max(now - self.window_started, 1e-9)),
        }
        for name in self.ANSWER_TASKS:
            row[f"answer_acc_{name}"] = _ratio(task.get(f"hit:{name}", 0),
                                               task.get(f"n:{name}", 0))
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


def next_batch(step: int, step_is_text: bool, data: dict, recipe: Recipe, generator):
    """("task" or "text", a list of equally sized parts of one step's batch)."""
    if step_is_text:
        return "text", text_batch(data["stream"], recipe, generator)
    weights = task_weights((step - 1) / recipe.steps)
    examples = [data["examples"].draw(weights) for _ in range(recipe.batch_size)]
    return "task", chat_batches(data["chat"], examples, recipe.gen_length, recipe.groups)


def train(model, data: dict, recipe: Recipe, log: TrainingLog) -> None:
    hooks = (RouterProbe(model), MaskedHead(model))
    optimizer = make_optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(1, recipe.steps + 1):
        is_text = torch.rand(1, generator=generator).item() < recipe.text_share
        kind, parts = next_batch(step, is_text, data, recipe, generator)
        optimizer.zero_grad(set_to_none=True)
        for part in parts:
            total, stats = diffusion_loss(model, hooks, part, recipe, data["special"],
                                          generator)
            # Equal parts with equal normalisers: the mean of their losses is the batch loss.
            (total / len(parts)).backward()
            log.add(kind, stats, len(parts))
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        log.end_step(kind)
        if step % recipe.log_every == 0 or step == recipe.steps:
            row = log.flush(step, schedule.get_last_lr()[0])
            print(_progress_line(row, recipe.steps), flush=True)
    log.write()


def _progress_line(row: dict, steps: int) -> str:
    def show(name):
        value = row[name]
        return f"{value:.3f}" if isinstance(value, float) else "-"

    answers = " ".join(f"{task} {show(f'answer_acc_{task}')}"
                       for task in TrainingLog.ANSWER_TASKS)
    return (f"step {row['step']:5d}/{steps} {row['seconds']:7.1f}s lr {row['lr']:.2e} | "
            f"task loss {show('task_loss')} acc {show('task_masked_acc')} | "
            f"text loss {show('text_loss')} acc {show('text_masked_acc')} | "
            f"aux {show('aux_loss')} | {row['tokens_per_s']} tok/s | answer acc {answers}")


# ---------------------------------------------------------------- save, evaluate, plot


def save(model, config: dict, tokenizer, special: dict, recipe: Recipe, out: Path) -> Path:
    """fp16 safetensors plus tokenizer, config and the sampler defaults it was scored with."""
    generation = {
        "bos_token_id": special["bos"], "eos_token_id": special["eos"],
        "mask_token_id": special["mask"], "algorithm": "llada",
        "gen_length": recipe.gen_length, "steps": recipe.gen_length,
        "block_length": recipe.gen_length, "remasking": "low_confidence", "temperature": 0.0,
    }
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return write_checkpoint(out, "llada-moe", config, state, tokenizer, generation,
                            torch.float16, shards=1, overwrite=True)


def evaluate(model_dir: Path, count: int) -> dict:
    """Held-out exact-match accuracy per task with the checkpoint's own sampler defaults."""
    from dllm_export.runtime import Generator

    generator = Generator.from_checkpoint(model_dir)
    return {task: tasks.task_accuracy(generator, tasks.held_out_examples(task, count))
            for task in tasks.TASKS}


CURVES = {  # column -> (panel, label)
    "task_loss": (0, "chat tasks"),
    "text_loss": (0, "stdlib text"),
    "task_masked_acc": (1, "chat tasks (answer + EOS padding)"),
    "text_masked_acc": (1, "stdlib text"),
    **{f"answer_acc_{task}": (1, f"{task} (answer tokens)") for task in tasks.TASKS},
}


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss and masked-token accuracy against the step, from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for column, (panel, label) in CURVES.items():
        points = [(int(r["step"]), float(r[column])) for r in rows if r[column]]
        axes[panel].plot(*zip(*points, strict=False), label=label)
    axes[0].set(xlabel="step", ylabel="LLaDA loss (1/t weighted)", yscale="log",
                title="training loss")
    axes[1].set(xlabel="step", ylabel="accuracy on masked tokens", ylim=(0, 1),
                title="masked-token accuracy")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)


# ---------------------------------------------------------------- main


def prepare(recipe: Recipe):
    """Tokenizer, special ids, text stream, chat formatter and an initialised model."""
    texts = stdlib_text(recipe.text_chars)
    tokenizer = train_tokenizer(recipe, texts)
    spec = llada_moe.TOKENIZER
    special = {role: tokenizer.token_to_id(spec[role]) for role in ("bos", "eos", "eot", "mask")}
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    config = model_config(recipe, vocab, special)
    torch.manual_seed(recipe.seed)
    model = llada_moe.Model(llada_moe.ModelArgs.from_dict(config))
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
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG,
                        help="CSV log; a .json summary and a .png plot are written beside it")
    parser.add_argument("--eval-count", type=int, default=100,
                        help="held-out prompts per task (0: skip the evaluation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override other Recipe fields, e.g. --set lr=1e-3 layers=6")
    return parser.parse_args()


def recipe_from_args(args) -> Recipe:
    recipe = Recipe(steps=args.steps, seed=args.seed)
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
    counts = llada_moe.parameter_counts(model.args)
    print(f"vocab {config['vocab_size']}, parameters {counts['total']:,} "
          f"({counts['active']:,} active), text stream {len(data['stream']):,} tokens, "
          f"prepared in {time.perf_counter() - started:.1f}s", flush=True)
    log = TrainingLog(args.log, recipe.log_every)
    train(model, data, recipe, log)
    train_seconds = time.perf_counter() - started
    out = save(model, config, tokenizer, data["special"], recipe, args.out)
    accuracy = evaluate(out, args.eval_count) if args.eval_count else {}
    summary = {
        "command": "python scripts/train_default_model.py " + " ".join(
            [f"--steps {args.steps}", f"--seed {args.seed}"] + (["--set", *args.set] if args.set else [])),
        "recipe": asdict(recipe), "parameters": counts,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "final": log.rows[-1], "held_out_accuracy": accuracy,
        "eval_count_per_task": args.eval_count,
        "size_bytes": (out / "model.safetensors").stat().st_size,
        "torch": torch.__version__,
    }
    args.log.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(args.log, args.log.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in ("train_seconds", "total_seconds",
                                              "held_out_accuracy", "size_bytes")}))


if __name__ == "__main__":
    main()
