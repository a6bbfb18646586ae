"""The unmasking loops against torch ports of the reference code
(reference_samplers.py).

At temperature 0 the runtime must commit the same tokens as the reference, at the same
steps, on the same denoiser: the tiny checkpoints through ``TorchBackend`` (with a fixed
logit bias, see ``Conditioned``), and a designed numpy backend whose distributions we
control (tiny random models almost never predict EOS).

Tolerance: none; the canvas after every step is compared exactly. Rounding differs
(the runtime ranks float32 log-softmax values from the decode head, LLaDA and Dream a
float32 softmax, Fast-dLLM a float64 one), so confidences within about 1e-7 (relative)
of each other or of a threshold could fall either way. Over the 1,400 selections of the
tiny-checkpoint tests the closest call is 8.6e-6 relative (about 70 ulps). Exact ties
(confidence_eos_eot_inf scores every EOS / EoT candidate 0) go to the lower position on
both sides (``reference_samplers.top_positions``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import reference_samplers as ref
import torch

from dllm_export.errors import DllmExportError
from dllm_export.families import NAMES as FAMILIES
from dllm_export.models.head import canvas_logits
from dllm_export.runtime import sampling
from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.generate import SamplerConfig, Special, _finish_rows, denoise
from dllm_export.runtime.prediction import summarize_logits

FAMILY_NAMES = list(FAMILIES)
PROMPT = [5, 17, 42, 99, 120, 7]
SHORT_PROMPT = [33, 8, 61]


def run(backend, prompts, special, **options):
    """The runtime with early exit off (the references have none); ``result.steps``
    holds the canvas after every step."""
    steps = []
    config = SamplerConfig(**{"early_exit": False, **options})
    record = lambda info: steps.append(info.canvas.copy())
    result = denoise(backend, prompts, config, special, on_step=record)
    result.steps = np.array(steps)
    return result


def assert_matches_reference(backend, logits_fn, prompts, special, **options):
    """Step for step, not only the final canvas: a different commit order can still end
    in the same tokens."""
    result = run(backend, prompts, special, **options)
    history = ref.reference_steps(logits_fn, prompts, **asdict(special), **options)
    want = torch.stack(history).numpy()
    np.testing.assert_array_equal(result.steps, want)
    np.testing.assert_array_equal(result.sequences, want[-1])
    assert result.forwards == len(want)
    return result


# ---------------------------------------------------------------- tiny checkpoints


pytestmark = pytest.mark.usefixtures("one_thread")

class Conditioned(torch.nn.Module):
    """A tiny model's logits plus a fixed bias per (position, token), and no mask token.

    Raw, the masked positions differ only through RoPE and their best probabilities tie
    within a float32 ulp (llada, gen 16 / steps 24 / block 8, step 2: 0.004168603569 and
    0.004168604501 at positions 8 and 9), so rounding would pick the commit order. The
    bias, N(0, s^2) with s in [0.5, 1.25] per position, is aligned to the canvas end
    (left padding does not move it); the model still supplies the dependence on the
    canvas.
    Like a trained model it never proposes the mask token (else Fast-dLLM never ends).
    """

    def __init__(self, model, mask_id, longest=128):
        super().__init__()
        self.inner, self.mask_id, self.longest = model, mask_id, longest
        self.bias = None

    def forward(self, input_ids, attention_mask=None):
        logits = canvas_logits(self.inner, input_ids, attention_mask)
        if self.bias is None:
            generator = torch.Generator().manual_seed(11)
            shape = (self.longest, logits.shape[-1])
            spread = 0.5 + 0.75 * torch.rand(self.longest, 1, generator=generator)
            self.bias = spread * torch.randn(shape, generator=generator)
            self.bias[:, self.mask_id] = -100.0
        return logits + self.bias[-logits.shape[1] :]


class Tiny:
    """A tiny checkpoint: special ids, backends and the ports' logits_fn."""

    def __init__(self, model, checkpoint):
        from dllm_export.checkpoint import resolve_special_tokens
        from dllm_export.runtime.tokenizer import TextTokenizer

        directory = Path(checkpoint.directory)
        tokenizer = TextTokenizer(directory)
        tokens = resolve_special_tokens(
            checkpoint.config, checkpoint.generation_config, tokenizer, directory
        )
        pad = tokens.pad_id if tokens.pad_id is not None else tokens.eos_id
        self.special = Special(tokens.mask_id, tokens.eos_id, tokens.eot_id, pad)
        self.model = Conditioned(model, tokens.mask_id)

    def backend(self, topk: int = 8):
        from dllm_export.runtime.backends.torch_backend import TorchBackend

        special_ids = (self.special.eos_id, self.special.eot_id)
        return TorchBackend(self.model, special_ids, topk)

    def logits_fn(self, x, attention_mask):
        # The runtime always passes a mask; without one the model would take another
        # attention path (same attention, other rounding), so the ports' None is ones.
        if attention_mask is None:
            attention_mask = torch.ones_like(x)
        return self.model(x, attention_mask)

    def check(self, prompts=(PROMPT,), topk=8, **options):
        args = self.backend(topk), self.logits_fn, list(prompts), self.special
        return assert_matches_reference(*args, **options)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    made = {}

    def get(family):
        if family not in made:
            made[family] = Tiny(*tiny_model(family))
        return made[family]

    return get


EOS_OPTIONS = [
    dict(logits_eos_inf=True),
    dict(confidence_eos_eot_inf=True),
    dict(logits_eos_inf=True, confidence_eos_eot_inf=True),
]
DREAM_ALGS = ["maskgit_plus", "topk_margin", "entropy"]
# top_p 0.1 < K / V = 64 / 384: the K most likely tokens always hold at least K / V of
# the mass, so the nucleus fits in the top-K and the runtime sees all of it.
TRUNCATIONS = {"top_p": (0.1, None), "top_k": (None, 5), "both": (0.1, 3)}


def _name(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "plain"


TINY_CASES = {
    # LLaDA (gen_length, steps, block_length): one token a step; 4 blocks of 2 steps of
    # 4 tokens; 3 steps a block of 3, 3, 2 tokens; more steps than masks (empty steps);
    # one block, 4 tokens a step
    **{
        f"llada-{g}-{s}-{b}": dict(gen_length=g, steps=s, block_length=b)
        for g, s, b in [(16, 16, 16), (32, 8, 8), (24, 9, 8), (16, 24, 8), (48, 12, 48)]
    },
    **{
        f"llada-{_name(o)}": dict(gen_length=32, steps=16, block_length=16, **o)
        for o in EOS_OPTIONS
    },
    **{
        f"llada-cfg-{w}": dict(gen_length=24, steps=12, block_length=8, cfg_scale=w)
        for w in (0.5, 2.0)
    },
    **{
        f"dream-{a}-{g}-{s}": dict(algorithm="dream", gen_length=g, steps=s, alg=a)
        for a in DREAM_ALGS
        for g, s in [(16, 16), (32, 8), (24, 10), (48, 20)]
    },
    **{
        f"dream-{a}-{kind}": dict(
            topk=64, algorithm="dream", gen_length=24, steps=8, alg=a, top_p=p, top_k=k
        )
        for a in DREAM_ALGS
        for kind, (p, k) in TRUNCATIONS.items()
    },
}


@pytest.mark.parametrize("case", list(TINY_CASES))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_checkpoint_matches_reference(tiny, family, case):
    result = tiny(family).check(**TINY_CASES[case])
    assert not (result.sequences == tiny(family).special.mask_id).any()


def _median_top_probability(case, gen_length):
    """A threshold that splits the first step's candidates: some commit, some wait. It
    lies halfway between two of them: at one of them, float rounding would decide."""
    canvas = torch.tensor([PROMPT + [case.special.mask_id] * gen_length])
    with torch.no_grad():
        probs = case.logits_fn(canvas, None).double().softmax(-1)[0, len(PROMPT) :]
    best = np.sort(probs.max(-1).values.numpy())
    return float(best[gen_length // 2 - 1] + best[gen_length // 2]) / 2


# 1e-30: every candidate passes (the lowest value in the (0, 1] range the option takes)
@pytest.mark.parametrize("threshold", [1e-30, "median", 1.0])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_threshold_matches_fast_dllm(tiny, family, threshold):
    case = tiny(family)
    if threshold == "median":
        threshold = _median_top_probability(case, 32)
    result = case.check(gen_length=32, steps=32, block_length=8, threshold=threshold)
    # 0 commits a block at once, 1 one position per step, the median some of each
    assert result.forwards == {1e-30: 4, 1.0: 32}.get(threshold, result.forwards)
    assert 4 <= result.forwards <= 32


BATCH_OPTIONS = [
    dict(gen_length=24, steps=12, block_length=8),
    dict(algorithm="dream", gen_length=24, steps=12, alg="entropy"),
]


@pytest.mark.parametrize("options", BATCH_OPTIONS, ids=["llada", "dream"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padded_batch_matches_single_prompts_and_reference(tiny, family, options):
    case = tiny(family)
    batch = case.check([PROMPT, SHORT_PROMPT], **options)
    for row, prompt in enumerate([PROMPT, SHORT_PROMPT]):
        alone = run(case.backend(), [prompt], case.special, **options)
        np.testing.assert_array_equal(
            batch.sequences[row, batch.prompt_length :],
            alone.sequences[0, alone.prompt_length :],
        )


# ---------------------------------------------------------------- a designed denoiser

VOCAB, EOS, EOT, MASK, STOP, ENDLESS = 16, 10, 11, 15, 9, 8
DESIGNED = Special(mask_id=MASK, eos_id=EOS, eot_id=EOT, pad_id=EOS)
# prompts of the same length, 4, whose first token steers the answer
FREE, STOPPING, NEVER_ENDING = [1, 2, 3, 4], [STOP, 2, 3, 4], [ENDLESS, 2, 3, 4]
_TABLE = np.random.default_rng(7).normal(scale=1.5, size=(64, VOCAB)).astype(np.float32)


def designed_logits(canvas: np.ndarray) -> np.ndarray:
    """Peaked, position-dependent logits where EOS and EoT often win or come close."""
    batch, length = canvas.shape
    logits = np.repeat(_TABLE[None, :length], batch, axis=0)
    logits[..., MASK] = -30.0  # like a trained model: never the mask token
    logits[..., [EOS, EOT]] += 1.0
    rows, cols = np.nonzero(canvas[:, :-1] != MASK)
    logits[rows, cols + 1, canvas[rows, cols] % 8] += 1.5  # the left neighbour matters
    logits[canvas[:, 0] == ENDLESS, :, EOS] = -30.0
    stopping = canvas[:, 0] == STOP  # answers "3 4 <eos>", EOS the most confident
    logits[stopping, 4, 3] += 13.0
    logits[stopping, 5, 4] += 12.0
    logits[stopping, 6, EOS] += 14.0
    return logits


def designed_fn(x, attention_mask):
    return torch.from_numpy(designed_logits(x.numpy()))


class DesignedBackend(Backend):
    name = "designed"

    def __init__(self, topk=8, seq_len=None, batch_size=None):
        self.topk, self.seq_len, self.batch_size = topk, seq_len, batch_size
        self.special_ids = (EOS, EOT)

    def _run_predict(self, input_ids, attention_mask):
        return summarize_logits(designed_logits(input_ids), self.topk, self.special_ids)

    def _run_logits(self, input_ids, attention_mask):
        return designed_logits(input_ids)


class PredictOnlyBackend(DesignedBackend):
    _run_logits = Backend._run_logits  # like an artifact exported with --outputs decode


def check_designed(prompts, **options):
    args = DesignedBackend(), designed_fn, prompts, DESIGNED
    return assert_matches_reference(*args, **options)


@pytest.mark.parametrize(
    "options", [dict(), *EOS_OPTIONS, dict(cfg_scale=1.0)], ids=_name
)
def test_designed_llada_matches_reference(options):
    shape = dict(gen_length=32, steps=16, block_length=8)
    generated = check_designed([FREE, STOPPING], **shape, **options).sequences[:, 4:]
    if not options:  # the design works: EOS and EoT are committed without the options
        assert (generated == EOS).any() and (generated == EOT).any()
    if options.get("logits_eos_inf"):
        assert not (generated == EOS).any()


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("prompt", [FREE, STOPPING], ids=["free", "stopping"])
def test_designed_threshold_matches_fast_dllm(prompt, threshold):
    check_designed(
        [prompt], gen_length=32, steps=32, block_length=16, threshold=threshold
    )


@pytest.mark.parametrize("alg", DREAM_ALGS)
def test_designed_dream_matches_reference(alg):
    check_designed(
        [FREE, STOPPING], algorithm="dream", gen_length=32, steps=12, alg=alg
    )


# ---------------------------------------------------------------- early exit


def test_finish_rows_needs_eos_after_a_committed_prefix():
    canvas = np.array(
        [
            [1, 2, 3, MASK, EOS, MASK, MASK],  # a mask before EOS: not finished
            [1, 2, 3, EOS, MASK, 5, MASK],  # finished: masks after EOS become EOS
            [1, 2, 3, 4, 5, MASK, EOT],  # EoT does not finish a row
            [1, 2, 3, MASK, MASK, MASK, MASK],  # already done: left alone
        ]
    )
    before = canvas.copy()
    done = _finish_rows(canvas, np.array([False, False, False, True]), 2, DESIGNED)
    assert done.tolist() == [False, True, False, True]
    assert canvas[1].tolist() == [1, 2, 3, EOS, EOS, 5, EOS]
    np.testing.assert_array_equal(canvas[[0, 2, 3]], before[[0, 2, 3]])


def test_early_exit_stops_when_the_answer_is_complete():
    options = dict(gen_length=16, steps=16, block_length=16)
    early = run(DesignedBackend(), [STOPPING], DESIGNED, early_exit=True, **options)
    full = run(DesignedBackend(), [STOPPING], DESIGNED, **options)
    # EOS (the most confident) commits first, then the two tokens before it: 3 forwards
    assert early.forwards == 3 and full.forwards == 16
    assert early.sequences[0, 4:].tolist() == [3, 4] + [EOS] * 14
    np.testing.assert_array_equal(early.sequences[0, :7], full.sequences[0, :7])


EARLY_EXIT_BATCH = {
    "llada": dict(gen_length=16, steps=16, block_length=8),
    "threshold": dict(gen_length=16, steps=8, block_length=16, threshold=0.5),
    "dream-entropy": dict(algorithm="dream", gen_length=16, steps=8, alg="entropy"),
    "dream-maskgit": dict(
        algorithm="dream", gen_length=24, steps=6, alg="maskgit_plus"
    ),
}


@pytest.mark.parametrize("case", list(EARLY_EXIT_BATCH))
def test_early_exit_leaves_other_rows_as_without_it(case):
    """A finished row stops; the others commit exactly what they would without early
    exit (Dream's per-step count is the batch mean of the mask counts, which must not
    count a finished row's filled masks as zero)."""
    options = EARLY_EXIT_BATCH[case]
    prompts = [STOPPING, NEVER_ENDING]
    early = run(DesignedBackend(), prompts, DESIGNED, early_exit=True, **options)
    full = run(DesignedBackend(), prompts, DESIGNED, **options)
    assert not (early.sequences == MASK).any()
    np.testing.assert_array_equal(early.sequences[1], full.sequences[1])
    np.testing.assert_array_equal(early.sequences[0, :7], full.sequences[0, :7])
    answer = [3, 4] + [EOS] * (options["gen_length"] - 2)
    assert early.sequences[0, 4:].tolist() == answer


# ---------------------------------------------------------------- seeds and randomness


def _trajectory(seed, options):
    committed = []
    config = SamplerConfig(seed=seed, early_exit=False, **options)
    record = lambda info: committed.append(info.committed.copy())
    result = denoise(DesignedBackend(), [FREE, FREE], config, DESIGNED, on_step=record)
    return result.sequences, np.array(committed)


LLADA16 = dict(gen_length=16, steps=8, block_length=16)
DREAM16 = dict(algorithm="dream", gen_length=16, steps=8)
RANDOM_OPTIONS = {
    "gumbel": dict(LLADA16, temperature=0.8),
    "random-remask": dict(LLADA16, remasking="random"),
    "threshold-gumbel": dict(LLADA16, temperature=1.0, threshold=0.5),
    "dream-sample": dict(DREAM16, alg="maskgit_plus", temperature=0.8, top_p=0.95),
    "dream-origin": dict(DREAM16, alg="origin"),
    "dream-alg-temp": dict(DREAM16, alg="entropy", alg_temp=0.5),
}


@pytest.mark.parametrize("case", list(RANDOM_OPTIONS))
def test_seed_makes_random_runs_reproducible(case):
    """Same seed: the same tokens committed at the same steps; another seed: not."""
    tokens, steps = _trajectory(0, RANDOM_OPTIONS[case])
    again_tokens, again_steps = _trajectory(0, RANDOM_OPTIONS[case])
    np.testing.assert_array_equal(tokens, again_tokens)
    np.testing.assert_array_equal(steps, again_steps)
    other_tokens, other_steps = _trajectory(1, RANDOM_OPTIONS[case])
    same_steps = other_steps.shape == steps.shape and (other_steps == steps).all()
    assert (other_tokens != tokens).any() or not same_steps


def test_dream_origin_commits_the_scheduled_fraction():
    """Each step keeps a mask with probability s/t, so after step i about
    N * t[i+1] of the N masks remain (the ratios telescope; t[0] = 1)."""
    steps, rows, gen_length = 8, 8, 48
    remaining = []
    options = dict(algorithm="dream", alg="origin", early_exit=False)
    config = SamplerConfig(gen_length=gen_length, steps=steps, **options)
    record = lambda info: remaining.append(int((info.canvas == MASK).sum()))
    denoise(DesignedBackend(), [FREE] * rows, config, DESIGNED, on_step=record)
    total = rows * gen_length
    timesteps = sampling.torch_linspace_f32(1.0, 1e-3, steps + 1)
    for step, left in enumerate(remaining[:-1]):
        kept = float(timesteps[step + 1])
        spread = (total * kept * (1 - kept)) ** 0.5  # binomial standard deviation
        assert abs(left - total * kept) <= 5 * spread + 1, (step, left, total * kept)
    assert remaining[-1] == 0  # the last step commits everything


# ---------------------------------------------------------------- bad input


def _error(call) -> str:
    with pytest.raises(DllmExportError) as caught:
        call()
    return str(caught.value)


def test_block_and_step_counts_must_divide():
    message = _error(lambda: SamplerConfig(gen_length=30, steps=30, block_length=8))
    assert message == "--gen-length 30 must be a multiple of --block-length 8"
    message = _error(lambda: SamplerConfig(gen_length=32, steps=6, block_length=8))
    assert message == (
        "--steps 6 must be a multiple of the number of blocks "
        "(4 = gen-length / block-length)"
    )
    SamplerConfig(gen_length=32, steps=6, block_length=8, threshold=0.9)  # steps unused


def test_prompt_longer_than_a_fixed_canvas():
    backend = DesignedBackend(seq_len=20)
    prompt = [1, 2, 3, 4, 5, 6]
    config = SamplerConfig(gen_length=16, steps=16, block_length=16, early_exit=False)
    message = _error(lambda: denoise(backend, [prompt], config, DESIGNED))
    assert message == (
        "prompt has 6 tokens but the engine fits 4 (seq-len 20 - gen-length 16); "
        "shorten the prompt, lower --gen-length, re-export with a larger --seq-len, or "
        "pass --truncate"
    )
    result = denoise(backend, [prompt, [7, 8]], config, DESIGNED, truncate=True)
    assert result.sequences.shape == (2, 20) and result.prompt_length == 4
    # truncation keeps the end of a prompt; a shorter one is left-padded
    assert result.sequences[:, :4].tolist() == [[3, 4, 5, 6], [EOS, EOS, 7, 8]]
    too_long = SamplerConfig(gen_length=20, steps=20, block_length=20)
    message = _error(lambda: denoise(backend, [prompt], too_long, DESIGNED))
    assert message == (
        "--gen-length 20 leaves no room for a prompt in the engine's fixed "
        "length 20; lower --gen-length"
    )


def test_cfg_needs_a_backend_with_logits():
    config = SamplerConfig(gen_length=16, steps=16, block_length=16, cfg_scale=1.0)
    message = _error(lambda: denoise(PredictOnlyBackend(), [FREE], config, DESIGNED))
    assert message == (
        "the designed backend has no logits output; classifier-free guidance and logit "
        "parity need an artifact exported with --outputs logits"
    )


def test_batch_larger_than_the_engine():
    backend = DesignedBackend(batch_size=2)
    config = SamplerConfig(gen_length=16, steps=16, block_length=16, cfg_scale=1.0)
    message = _error(lambda: denoise(backend, [FREE, FREE], config, DESIGNED))
    assert message == (
        "4 sequences per step exceed the engine's batch 2 (CFG doubles the "
        "batch); re-export with a larger --batch"
    )
    # a smaller batch is padded up to the engine's and trimmed back
    result = denoise(backend, [FREE], config.updated(cfg_scale=0.0), DESIGNED)
    assert result.sequences.shape == (1, 20)


def test_default_block_length_follows_a_shorter_gen_length():
    """--gen-length 16 under the families' default block of 32: one block of 16 (it used
    to refuse, 16 not being a multiple of 32). An explicit --block-length is kept, and so
    are LLaDA2's blocks, which are the model's own."""
    defaults = SamplerConfig(gen_length=128, steps=128, block_length=32)
    assert defaults.updated(gen_length=16).block_length == 16
    assert defaults.updated(gen_length=64).block_length == 32  # longer: unchanged
    message = _error(lambda: defaults.updated(gen_length=16, block_length=32))
    assert message == "--gen-length 16 must be a multiple of --block-length 32"
    llada2 = SamplerConfig(algorithm="llada2", gen_length=256, steps=32, block_length=32)
    assert llada2.updated(gen_length=16).block_length == 32


def test_default_steps_follow_a_shorter_gen_length():
    """--gen-length 16 under 128 default steps: 16 steps (one token each), not 128 forwards
    of which 112 would commit nothing; explicit --steps, a longer --gen-length and LLaDA2's
    steps per block are kept."""
    defaults = SamplerConfig(gen_length=128, steps=128, block_length=32)
    assert defaults.updated(gen_length=16).steps == 16
    assert defaults.updated(gen_length=64, block_length=16).steps == 64
    assert defaults.updated(gen_length=256).steps == 128  # longer: unchanged
    assert defaults.updated(gen_length=16, steps=32).steps == 32
    dream = SamplerConfig(algorithm="dream", gen_length=128, steps=128)
    assert dream.updated(gen_length=8).steps == 8
    llada2 = SamplerConfig(algorithm="llada2", gen_length=256, steps=32, block_length=32)
    assert llada2.updated(gen_length=16).steps == 32


def test_generate_and_run_take_a_gen_length_below_the_default_block(tiny_dir, artifact):
    """The CLI (checkpoint and artifact) and the Python API with only --gen-length 16."""
    from click.testing import CliRunner

    from dllm_export.cli import main
    from dllm_export.runtime import Generator

    runner = CliRunner()
    for verb, path in (("generate", tiny_dir("llada")), ("run", artifact("llada"))):
        result = runner.invoke(main, [verb, str(path), "--prompt", "Hi", "--gen-length", "16",
                                      "--steps", "16"])
        assert result.exit_code == 0, result.output
    out = Generator.from_artifact(artifact("llada")).generate("Hi", gen_length=16, steps=16)
    assert len(out.tokens[0]) <= 16 and out.forwards >= 1
