"""Cached decoding on the PyTorch backend: exactness, Fast-dLLM parity, the causal mode.

* ``prefix`` and ``dual`` against torch ports of Fast-dLLM's ``generate_with_prefix_cache``
  and ``generate_with_dual_cache`` (reference_samplers.py), which combine keys their own
  way (concatenation; in-place replacement of the block's slots) where the runtime builds
  visibility masks: at temperature 0 every committed canvas must be the same.
* ``block`` against the no-cache run under the block-causal rule: the same canvas after
  every step (it is exact, whatever the model was trained for).
* The causal mode of each family's forward against transformers' own causal classes: the
  full causal forward (max |logit difference|) and greedy decoding with the cache (token
  for token with ``generate``).

Tolerance: tokens exactly. Near-ties are kept away by ``PositionBiased`` (as in
test_generate.Conditioned); the two sides sum attention over the same keys in different
orders, so logits differ by float32 rounding only (about 1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference_samplers as ref
import torch
from references import PositionBiased, causal_reference

from dllm_export import families
from dllm_export.models.head import canvas_logits
from dllm_export.runtime.attention import (
    block_ids,
    cached_mask,
    canvas_mask,
    visibility,
)
from dllm_export.runtime.autoregressive import greedy_decode
from dllm_export.runtime.backends.torch_backend import TorchBackend
from dllm_export.runtime.generate import SamplerConfig, Special, denoise

PROMPT = [5, 17, 42, 99, 120, 7]


pytestmark = pytest.mark.usefixtures("one_thread")


class Setup:
    def __init__(self, family, tiny_model):
        from pathlib import Path

        from dllm_export.checkpoint import resolve_special_tokens
        from dllm_export.runtime.tokenizer import TextTokenizer

        model, checkpoint = tiny_model(family)
        tokenizer = TextTokenizer(Path(checkpoint.directory))
        tokens = resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                                        tokenizer, Path(checkpoint.directory))
        pad = tokens.pad_id if tokens.pad_id is not None else tokens.eos_id
        self.special = Special(tokens.mask_id, tokens.eos_id, tokens.eot_id, pad)
        self.model = PositionBiased(model, tokens.mask_id, seed=11)
        self.family = families.family(family)
        self.backend = TorchBackend(self.model, (tokens.eos_id, tokens.eot_id))

    def run(self, prompts, **options):
        steps = []
        config = SamplerConfig(**{"algorithm": "llada", "early_exit": False, **options})
        result = denoise(self.backend, prompts, config, self.special,
                         on_step=lambda info: steps.append(info.canvas.copy()),
                         family=self.family)
        result.steps = np.array(steps)
        return result


@pytest.fixture(scope="module")
def setups(tiny_model):
    made = {}

    def get(family):
        if family not in made:
            made[family] = Setup(family, tiny_model)
        return made[family]

    return get


def _distinct(states):
    """Canvas states with consecutive repeats (steps that committed nothing) dropped."""
    out = [states[0]]
    for state in states[1:]:
        if not np.array_equal(state, out[-1]):
            out.append(state)
    return np.array(out)


FAST_DLLM_CASES = {
    "schedule": dict(gen_length=16, steps=8, block_length=8),
    "schedule-one-block": dict(gen_length=12, steps=6, block_length=12),
    "threshold-0.9": dict(gen_length=16, steps=16, block_length=8, threshold=0.9),
    "threshold-0.3": dict(gen_length=24, steps=24, block_length=8, threshold=0.3),
}


@pytest.mark.parametrize("case", sorted(FAST_DLLM_CASES))
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "llada-moe"])
def test_prefix_and_dual_match_fast_dllm(family, mode, case, setups):
    setup = setups(family)
    options = FAST_DLLM_CASES[case]
    result = setup.run([PROMPT], cache=mode, **options)
    history = []
    _, forwards = ref.fast_dllm_cached_generate(
        ref.CachedModel(setup.model), torch.tensor([PROMPT]), dual=mode == "dual",
        mask_id=setup.special.mask_id, history=history, **options)
    want = torch.stack(history).numpy()
    np.testing.assert_array_equal(_distinct(result.steps), _distinct(want))
    np.testing.assert_array_equal(result.sequences, want[-1])
    # Fast-dLLM runs one cached step even when the refresh forward filled the block.
    assert result.forwards <= forwards
    assert result.cache == mode


def test_cached_modes_need_fewer_positions_but_not_fewer_commits(setups):
    """dual computes the block alone after each refresh: same tokens per forward count
    as none for a scheduled run, and one full forward per block."""
    setup = setups("llada")
    calls = []
    original = setup.backend._call

    def spy(ids, positions, mask, past):
        calls.append(ids.shape[1])
        return original(ids, positions, mask, past)

    setup.backend._call = spy
    try:
        setup.run([PROMPT], cache="dual", gen_length=16, steps=8, block_length=8)
    finally:
        setup.backend._call = original
    canvas = len(PROMPT) + 16
    assert calls == [canvas, 8, 8, 8, canvas, 8, 8, 8]


BLOCK_CASES = {
    "schedule": dict(gen_length=16, steps=8, block_length=4),
    "threshold": dict(gen_length=16, steps=16, block_length=8, threshold=0.5),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_block_cache_equals_the_block_causal_canvas(family, case, setups):
    setup = setups(family)
    options = BLOCK_CASES[case]
    prompts = [PROMPT, [33, 8, 61]]  # left padding in the second row
    cached = setup.run(prompts, cache="block", **options)
    full = setup.run(prompts, cache="none", attention="block_causal", **options)
    np.testing.assert_array_equal(cached.steps, full.steps)
    assert cached.attention == full.attention == "block_causal"
    blocks = options["gen_length"] // options["block_length"]
    # the prompt prefill and one commit forward per finished block, but the last
    assert cached.forwards == full.forwards + 1 + (blocks - 1)


def test_block_cache_differs_from_bidirectional(setups):
    """The rule matters: the bidirectional canvas commits other tokens on this model."""
    setup = setups("llada")
    options = BLOCK_CASES["schedule"]
    block = setup.run([PROMPT], cache="block", **options)
    bidirectional = setup.run([PROMPT], cache="none", **options)
    assert not np.array_equal(block.sequences, bidirectional.sequences)


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_causal_forward_matches_transformers(family, tiny_model):
    model, _ = tiny_model(family)
    ids = torch.randint(5, 300, (1, 14), generator=torch.Generator().manual_seed(3))
    real = np.ones((1, 14), dtype=bool)
    mask = torch.from_numpy(canvas_mask("causal", real))
    with torch.no_grad():
        ours = model(ids, positions=torch.arange(14)[None], visible=mask)
        theirs = causal_reference(family, model)(input_ids=ids).logits.float()
    assert (ours - theirs).abs().max().item() < 2e-5


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_greedy_decoding_with_the_cache_matches_transformers_generate(family, tiny_model):
    model, checkpoint = tiny_model(family)
    backend = TorchBackend(model, (1,))
    prompt = [11, 250, 3, 77, 19]
    got = greedy_decode(backend, prompt, 10, pad_id=0,
                        positions_rule=families.family(family).positions)
    reference = causal_reference(family, model)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                 attention_mask=torch.ones(1, 5, dtype=torch.long),
                                 pad_token_id=0, eos_token_id=None)
    assert got.tokens == out[0, 5:].tolist()
    assert len(got.token_seconds) == 9


def test_visibility_rules():
    real = np.array([[False, True, True, True, True, True]])
    blocks = block_ids(6, prompt_length=2, block_length=2)  # [0 0 | 1 1 | 2 2]
    assert blocks.tolist() == [0, 0, 1, 1, 2, 2]
    full = canvas_mask("block_causal", real, blocks)[0]
    assert full[1].tolist() == [False, True, False, False, False, False]  # prompt: itself
    assert full[2].tolist() == [False, True, True, True, False, False]
    # a left pad is a query like any other (its row is never read); no key sees it
    assert full[0].tolist() == [True, True, False, False, False, False]
    assert not full[1:, 0].any()
    causal = canvas_mask("causal", real)[0]
    assert causal[3].tolist() == [False, True, True, True, False, False]
    assert canvas_mask("bidirectional", real)[0, 4].tolist() == [False] + [True] * 5
    # A cached call over positions 2..3 with slots 0..3 written: the slots it recomputes
    # are hidden (its own rows win), padding rows see only themselves.
    valid = np.array([[True, True, True, True, False, False]])
    queries = np.array([[2, 3, -1]])
    mask = cached_mask("bidirectional", queries, valid, real)[0]
    assert mask.shape == (3, 9)
    assert mask[0].tolist() == [False, True, False, False, False, False, True, True, False]
    assert mask[2].tolist() == [False] * 8 + [True]
    with pytest.raises(ValueError):
        visibility("block_causal", queries, queries, real)


def test_cache_flags_refused_in_one_line(setups):
    from dllm_export.errors import DllmExportError

    with pytest.raises(DllmExportError, match="--cache 'full'"):
        SamplerConfig(cache="full")
    with pytest.raises(DllmExportError, match="--cfg-scale with --cache dual"):
        SamplerConfig(cache="dual", cfg_scale=1.0)
    with pytest.raises(DllmExportError, match="--cache prefix decodes block by block"):
        SamplerConfig(algorithm="dream", cache="prefix")
    setup = setups("llada")
    with pytest.raises(DllmExportError, match="--cache block is exact only under"):
        setup.run([PROMPT], cache="block", attention="bidirectional", gen_length=8, steps=8,
                  block_length=8)


def test_canvas_logits_of_a_cached_family_are_its_canvas(tiny_model):
    """The prefill call (positions, mask) and the canvas call give the same rows."""
    model, _ = tiny_model("dream")
    ids = torch.randint(5, 300, (1, 10))
    real = np.ones((1, 10), dtype=bool)
    with torch.no_grad():
        canvas = canvas_logits(model, ids)
        raw = model(ids, positions=torch.arange(10)[None],
                    visible=torch.from_numpy(canvas_mask("bidirectional", real)))
    assert (canvas[:, 1:] - raw[:, :-1]).abs().max() < 1e-5
