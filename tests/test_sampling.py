"""Per-step decisions (runtime/sampling.py) against the reference code's own formulas
(ported in reference_samplers.py), on synthetic logits where we control the shape."""

from __future__ import annotations

import numpy as np
import pytest
import reference_samplers as ref
import torch

from dllm_export.models.head import HEAD_ROWS, DecodeHead
from dllm_export.runtime import sampling
from dllm_export.runtime.prediction import log_softmax, summarize_logits

VOCAB, EOS, EOT = 40, 1, 2
SPECIAL = (EOS, EOT)


def random_logits(seed, shape=(2, 12, VOCAB), scale=2.5, special_boost=2.0):
    """Peaked logits in which EOS and EoT are often the best or close to it."""
    logits = np.random.default_rng(seed).normal(scale=scale, size=shape)
    logits[..., [EOS, EOT]] += special_boost
    return logits.astype(np.float32)


def frequencies(choices, size):
    return np.bincount(choices.ravel(), minlength=size) / choices.size


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-5, 1e-2, 0.05, 0.3])
def test_torch_linspace_f32_matches_torch_linspace(eps):
    """Dream's timesteps, bit for bit: its transfer counts truncate products of them."""
    for steps in [*range(1, 300), 511, 512, 1000, 1024]:
        want = torch.linspace(1, eps, steps + 1, dtype=torch.float32).numpy()
        got = sampling.torch_linspace_f32(1.0, eps, steps + 1)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=f"steps={steps}")


@pytest.mark.parametrize("ends", [(0.0, 1.0), (2.5, -3.7), (-1.0, 1.0), (1e3, 1e-3)])
def test_torch_linspace_f32_matches_torch_linspace_on_other_ranges(ends):
    for count in [1, 2, 3, *range(4, 130, 7), 257]:
        want = torch.linspace(*ends, count, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(
            sampling.torch_linspace_f32(*ends, count), want, err_msg=f"count={count}"
        )


def test_llada_transfer_counts_match_reference():
    rng = np.random.default_rng(0)
    for steps in [1, 2, 3, 7, 8, 16, 33, 64]:
        mask_counts = rng.integers(0, 65, size=6)
        mask_index = torch.arange(64)[None, :] < torch.from_numpy(mask_counts)[:, None]
        want = ref.get_num_transfer_tokens(mask_index, steps).numpy()
        got = sampling.llada_transfer_counts(mask_counts, steps)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.sum(axis=1), mask_counts)


# ---------------------------------------------------------------- the decode head


@pytest.mark.parametrize("k", [1, 8, VOCAB])
def test_summarize_logits_matches_decode_head(k):
    """Both are float32 over the whole vocabulary; sums run in different orders, so
    values agree to a few float32 ulps (log-probabilities up to about 20 in size)."""
    logits = random_logits(1, scale=4.0)
    got = summarize_logits(logits, k, SPECIAL)
    with torch.no_grad():
        ids, logprobs, neg_entropy, special = DecodeHead(k, SPECIAL)(
            torch.from_numpy(logits)
        )
    np.testing.assert_array_equal(got.topk_ids, ids.numpy())
    np.testing.assert_allclose(got.topk_logprobs, logprobs.numpy(), rtol=0, atol=4e-6)
    np.testing.assert_allclose(got.neg_entropy, neg_entropy.numpy(), rtol=0, atol=4e-6)
    np.testing.assert_allclose(got.special_logprobs, special.numpy(), rtol=0, atol=4e-6)
    np.testing.assert_array_equal(got.special(EOT), got.special_logprobs[..., 1])


@pytest.mark.parametrize("rows", [HEAD_ROWS - 1, HEAD_ROWS, 2 * HEAD_ROWS + 5])
def test_the_head_over_chunks_of_rows_is_the_head_over_the_whole_canvas(rows):
    """The exported head runs over chunks of HEAD_ROWS rows (peak memory); each row's
    outputs are bit for bit those of the head over every row at once."""
    logits = torch.from_numpy(random_logits(4, shape=(2, rows, VOCAB), scale=4.0))
    head = DecodeHead(8, SPECIAL)
    with torch.no_grad():
        chunked, whole = head(logits), head.summarize(logits)
    for got, want in zip(chunked, whole, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("excluded", [[], [EOS], [EOT], [EOS, EOT], [EOS, EOS]])
@pytest.mark.parametrize(
    "boost", [0.0, 2.0, 6.0], ids=["plain", "often-top", "dominant"]
)
def test_excluding_equals_softmax_with_those_logits_at_minus_inf(excluded, boost):
    """Removing EOS / EoT from the top-K is renormalising the full softmax without them.
    Tolerance: the top-K and special log-probabilities arrive in float32 (about 1e-6
    absolute here); with EOS dominant (about 0.99 of the mass) the renormalisation
    divides by the small remainder, which costs a few more bits."""
    logits = random_logits(2, special_boost=boost)
    pred = summarize_logits(logits, 8, SPECIAL)
    got = sampling._excluding(pred, excluded)
    full = logits.astype(np.float64)
    full[..., excluded] = -np.inf
    full -= full.max(axis=-1, keepdims=True)
    full -= np.log(np.exp(full).sum(axis=-1, keepdims=True))
    want = np.take_along_axis(full, pred.topk_ids, axis=-1)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=2e-5)


# ---------------------------------------------------------------- LLaDA candidates

LLADA_FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize(
    "flags",
    LLADA_FLAGS,
    ids=["plain", "logits_eos_inf", "confidence_eos_eot_inf", "both"],
)
def test_llada_candidates_match_reference_at_temperature_zero(flags):
    logits_eos_inf, confidence_eos_eot_inf = flags
    logits = random_logits(3)
    pred = summarize_logits(logits, 8, SPECIAL)
    x0, confidence = sampling.llada_candidates(
        pred,
        0.0,
        "low_confidence",
        None,
        EOS,
        EOT,
        logits_eos_inf,
        confidence_eos_eot_inf,
    )
    want_x0, want_confidence = ref.llada_x0_confidence(
        torch.from_numpy(logits),
        0.0,
        "low_confidence",
        EOS,
        EOT,
        logits_eos_inf,
        confidence_eos_eot_inf,
    )
    np.testing.assert_array_equal(x0, want_x0.numpy())
    # float32 softmax there, float32 log-softmax exponentiated here
    np.testing.assert_allclose(
        confidence, want_confidence.numpy(), rtol=2e-6, atol=1e-9
    )
    if confidence_eos_eot_inf:  # the quirk: at temperature 0 both EOS and EoT score 0
        assert (confidence[np.isin(x0, SPECIAL)] == 0).all()
        assert np.isin(x0, SPECIAL).any()  # and the test exercised it


def test_confidence_eos_eot_inf_with_noise_hides_only_eot():
    """With temperature the reference's noised logits are a copy, so EOS keeps its
    probability in the confidence softmax and only EoT leaves it."""
    logits = random_logits(4)
    pred = summarize_logits(logits, VOCAB, SPECIAL)
    x0, confidence = sampling.llada_candidates(
        pred, 0.7, "low_confidence", np.random.default_rng(0), EOS, EOT, False, True
    )
    hidden = logits.astype(np.float64)
    hidden[..., EOT] = -np.inf
    probs = np.exp(hidden - hidden.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(confidence, want, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("logits_eos_inf", [False, True])
def test_llada_gumbel_draws_follow_the_tempered_softmax(logits_eos_inf):
    """Gumbel-max over the top-K samples softmax(logits / T) restricted to the top-K;
    with K = V that is the reference's distribution. 20000 draws: a frequency's standard
    deviation is at most 0.0035, and the bound is 0.015."""
    temperature, vocab, draws = 0.7, 6, 20000
    logits = np.broadcast_to(
        np.array([1.0, 0.4, 0.8, -0.5, 0.0, 0.3], np.float32), (1, draws, vocab)
    )
    pred = summarize_logits(logits, vocab, SPECIAL)
    x0, _ = sampling.llada_candidates(
        pred,
        temperature,
        "low_confidence",
        np.random.default_rng(5),
        EOS,
        EOT,
        logits_eos_inf,
        False,
    )
    tempered = logits[0, 0].astype(np.float64) / temperature
    if logits_eos_inf:
        tempered[EOS] = -np.inf
    want = np.exp(tempered - tempered.max())
    np.testing.assert_allclose(frequencies(x0, vocab), want / want.sum(), atol=0.015)


def test_llada_random_remasking_keeps_the_candidates():
    logits = random_logits(6)
    pred = summarize_logits(logits, 8, SPECIAL)
    greedy, _ = sampling.llada_candidates(
        pred, 0.0, "low_confidence", None, EOS, EOT, False, False
    )
    x0, confidence = sampling.llada_candidates(
        pred, 0.0, "random", np.random.default_rng(0), EOS, EOT, False, False
    )
    np.testing.assert_array_equal(x0, greedy)
    assert ((confidence >= 0) & (confidence < 1)).all()


# ---------------------------------------------------------------- Dream candidates

DREAM_ALGS = ["maskgit_plus", "topk_margin", "entropy"]
K = 16


def _nucleus_fits(logits, top_p, top_k, temperature=0.0):
    """The precondition for exactness: the reference keeps nothing outside the top-K."""
    scaled = torch.from_numpy(logits) / (temperature or 1.0)
    kept = scaled
    if top_p is not None:
        kept = ref.top_p_logits(kept, top_p)
    if top_k is not None:
        kept = ref.top_k_logits(kept, top_k)
    return int((kept > torch.finfo(torch.float32).min).sum(-1).max()) <= K


@pytest.mark.parametrize(
    "truncation",
    [(None, None), (0.3, None), (0.8, None), (None, 3), (0.8, 4), (1.0, None)],
    ids=["none", "top_p-0.3", "top_p-0.8", "top_k", "both", "top_p-1"],
)
@pytest.mark.parametrize("alg", DREAM_ALGS)
def test_dream_candidates_match_sample_tokens_at_temperature_zero(alg, truncation):
    """Untempered, the top-K log-probabilities are the exact full-vocabulary values, so
    top-p and top-k on them match the reference whenever the nucleus fits in the top-K.
    Tolerance: float32 probabilities there, float64 from float32 log-probabilities
    here."""
    top_p, top_k = truncation
    logits = random_logits(7, shape=(48, VOCAB), scale=3.0)
    if truncation not in [(None, None), (1.0, None)]:  # those read top-1/2 and entropy
        assert _nucleus_fits(logits, top_p, top_k)
    pred = summarize_logits(logits[None], K, SPECIAL)
    confidence, x0 = sampling.dream_candidates(pred, alg, 0.0, top_p, top_k, None)
    want_confidence, want_x0 = ref.sample_tokens(
        torch.from_numpy(logits),
        0.0,
        top_p,
        top_k,
        margin_confidence=alg == "topk_margin",
        neg_entropy=alg == "entropy",
    )
    np.testing.assert_array_equal(x0[0], want_x0.numpy())
    np.testing.assert_allclose(
        confidence[0], want_confidence.numpy(), rtol=0, atol=4e-6
    )


@pytest.mark.parametrize("truncation", [(None, None), (0.6, None), (None, 4), (0.9, 3)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_dream_truncation_with_temperature_matches_reference(temperature, truncation):
    """Tempered, the reference applies top-p to the tempered full-vocabulary mass; the
    runtime renormalises the tempered top-K first, so it is exact when the top-K holds
    the whole vocabulary (here K = V) and an approximation otherwise."""
    top_p, top_k = truncation
    logits = random_logits(8, shape=(32, VOCAB), scale=2.0)
    pred = summarize_logits(logits[None], VOCAB, SPECIAL)
    got = sampling._dream_truncated(
        pred.topk_logprobs.astype(np.float64)[0], temperature, top_p, top_k
    )
    scaled = torch.from_numpy(logits).double() / temperature
    if top_p is not None:
        scaled = ref.top_p_logits(scaled, top_p)
    if top_k is not None:
        scaled = ref.top_k_logits(scaled, top_k)
    want = np.take_along_axis(torch.softmax(scaled, -1).numpy(), pred.topk_ids[0], -1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_dream_draws_follow_the_truncated_distribution():
    """Sampled x0 at temperature > 0 follows the reference's probabilities; its
    confidence is the drawn token's probability (0.015: see the LLaDA draw test)."""
    draws, temperature, top_p = 20000, 0.8, 0.9
    row = np.array([1.2, 0.1, 0.9, -0.4, 0.6, -2.0, 0.0, 0.3], np.float32)
    logits = np.broadcast_to(row, (1, draws, row.size))
    pred = summarize_logits(logits, row.size, SPECIAL)
    confidence, x0 = sampling.dream_candidates(
        pred, "maskgit_plus", temperature, top_p, None, np.random.default_rng(9)
    )
    scaled = ref.top_p_logits(torch.from_numpy(row[None]).double() / temperature, top_p)
    want = torch.softmax(scaled, -1)[0].numpy()
    np.testing.assert_allclose(frequencies(x0, row.size), want, atol=0.015)
    np.testing.assert_allclose(confidence[0], want[x0[0]], rtol=1e-6)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_select_threshold_matches_fast_dllm(threshold):
    logits = random_logits(10, shape=(4, 20, VOCAB), scale=3.0)
    rng = np.random.default_rng(11)
    masked = rng.random((4, 20)) < 0.7
    masked[:, 15:] = False  # past the current block
    masked[3] = False  # a row with nothing left to commit
    canvas = np.where(masked, 39, rng.integers(3, 30, (4, 20)))
    want_x0, want = ref.get_transfer_index(
        torch.from_numpy(logits),
        0.0,
        "low_confidence",
        torch.from_numpy(masked),
        torch.from_numpy(canvas),
        None,
        threshold,
    )
    pred = summarize_logits(logits, 8, SPECIAL)
    x0, confidence = sampling.llada_candidates(
        pred, 0.0, "low_confidence", None, EOS, EOT, False, False
    )
    chosen = sampling.select_threshold(np.where(masked, confidence, -np.inf), threshold)
    np.testing.assert_array_equal(chosen, want.numpy())
    np.testing.assert_array_equal(x0[chosen], want_x0.numpy()[chosen])
    assert chosen[:3].sum(axis=1).min() >= 1 and not chosen[3].any()


def test_select_threshold_includes_ties_and_always_the_best():
    confidence = np.array(
        [[0.2, 0.5, 0.7, -np.inf], [0.1, 0.3, 0.2, 0.05], [-np.inf] * 4]
    )
    chosen = sampling.select_threshold(confidence, 0.5)
    assert chosen.tolist() == [
        [False, True, True, False],
        [False, True, False, False],
        [False] * 4,
    ]


def test_select_top_takes_the_count_breaking_ties_by_position():
    confidence = np.array(
        [
            [0.3, 0.9, 0.3, 0.3, -np.inf],
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [0.5, -np.inf, -np.inf, -np.inf, -np.inf],
        ]
    )
    chosen = sampling.select_top(confidence, np.array([3, 0, 2]))
    assert chosen.tolist() == [
        [True, True, True, False, False],
        [False] * 5,
        [True, False, False, False, False],
    ]


def test_sample_positions_draws_distinct_finite_positions():
    rng = np.random.default_rng(12)
    confidence = np.array([[0.9, 0.1, -np.inf, 0.5, 0.2, -np.inf]] * 200)
    chosen = sampling.sample_positions(confidence, np.full(200, 2), 0.5, rng)
    assert (chosen.sum(axis=1) == 2).all()
    assert not chosen[:, [2, 5]].any()
    # softmax(confidence / 0.5) makes position 0 the likeliest first draw
    assert chosen[:, 0].mean() > chosen[:, 1].mean()
    few = sampling.sample_positions(confidence[:1], np.array([9]), 0.5, rng)
    assert few[0].tolist() == [True, True, False, True, True, False]


def test_log_softmax_is_normalised_in_float32():
    logits = random_logits(13)
    logprobs = log_softmax(logits)
    assert logprobs.dtype == np.float32
    np.testing.assert_allclose(
        np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-6
    )
