"""Numeric validation of an export: ONNX Runtime CPU against the PyTorch model.

Inputs are canvases like the ones decoding produces: a prompt followed by a response masked
at several ratios, plus a left-padded case. Metrics are taken on masked positions only
(those are the predictions the sampler uses).

Bars (against the PyTorch model in the export dtype):
* fp32: top-1 agreement >= 99.9%, mean cosine >= 0.99999 (float rounding only).
* fp16: top-1 >= 99%, cosine >= 0.999; bf16: top-1 >= 98%, cosine >= 0.995. Half-precision
  kernels accumulate in different orders in PyTorch and ONNX Runtime, and bf16 keeps 8 bits
  of mantissa; near-tied positions can flip without the model being wrong.
"""

from __future__ import annotations

import numpy as np

BARS = {
    "fp32": {"top1_agreement": 0.999, "cosine": 0.99999},
    "fp16": {"top1_agreement": 0.99, "cosine": 0.999},
    "bf16": {"top1_agreement": 0.98, "cosine": 0.995},
}
MASK_RATIOS = (0.1, 0.5, 0.9)


def validation_canvases(manifest: dict, ratios=MASK_RATIOS, seed: int = 0):
    """(name, input_ids, attention_mask, masked) tuples at the artifact's fixed shape."""
    rng = np.random.default_rng(seed)
    batch, length = manifest["shapes"]["batch"], manifest["shapes"]["seq_len"]
    special = manifest["special_tokens"]
    reserved = {v for v in special.values() if v is not None}
    vocab = np.array([t for t in range(manifest["tokenizer_vocab_size"]) if t not in reserved])
    prompt = max(1, length // 4)
    cases = []
    for ratio in ratios:
        ids = rng.choice(vocab, size=(batch, length))
        masked = np.zeros((batch, length), dtype=bool)
        masked[:, prompt:] = rng.random((batch, length - prompt)) < ratio
        ids[masked] = special["mask_id"]
        cases.append((f"mask_{ratio}", ids, np.ones_like(ids), masked))
    # Left padding: the first rows' prompt starts late; padded keys must be ignored.
    ids = rng.choice(vocab, size=(batch, length))
    attention = np.ones_like(ids)
    pad = prompt // 2
    attention[0, :pad] = 0
    ids[0, :pad] = special.get("pad_id") if special.get("pad_id") is not None else special["eos_id"]
    masked = np.zeros((batch, length), dtype=bool)
    masked[:, prompt:] = rng.random((batch, length - prompt)) < 0.5
    ids[masked] = special["mask_id"]
    cases.append(("left_padded", ids, attention, masked))
    return cases


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Rows are masked positions: [N, V] each."""
    cos = _cosine(ref.astype(np.float64), got.astype(np.float64))
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


def compare_decode(ref: tuple, got: tuple) -> dict:
    """Decode-head outputs at masked positions: ids [N, K], logprobs [N, K], entropy [N].

    The cosine is between the two top-K probability vectors aligned by token id (a token
    missing from one side counts as probability 0 there).
    """
    ref_ids, ref_lp, ref_ent = ref
    got_ids, got_lp, got_ent = got
    union = np.concatenate([ref_ids, got_ids], axis=1)  # [N, 2K]

    def probs_on(ids, logprobs):
        hit = union[:, :, None] == ids[:, None, :]  # [N, 2K, K]
        return (hit * np.exp(logprobs.astype(np.float64))[:, None, :]).sum(-1)

    cos = _cosine(probs_on(ref_ids, ref_lp), probs_on(got_ids, got_lp))
    same = ref_ids[:, 0] == got_ids[:, 0]
    return {
        "max_abs_diff": float(np.abs(ref_lp[same, 0] - got_lp[same, 0]).max()) if same.any() else float("inf"),
        "max_entropy_diff": float(np.abs(ref_ent - got_ent).max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float(same.mean()),
    }


def _compare_rows(ref, got, rows) -> dict:
    metrics = compare_decode(
        (ref.topk_ids[rows], ref.topk_logprobs[rows], ref.neg_entropy[rows]),
        (got.topk_ids[rows], got.topk_logprobs[rows], got.neg_entropy[rows]))
    return {**metrics, "positions": int(rows.sum())}


def cached_cases(reference, backend, manifest: dict):
    """(name, metrics) of the cached graphs, each call made on both backends with the same
    inputs: a prefill under each rule, then a block step over the cache, a commit that
    writes the block, the next block's step (which reads what was written), a prefix
    window, and a causal decode step. Compared on real query rows."""
    from dllm_export.runtime.attention import (
        block_ids,
        cached_mask,
        canvas_mask,
        rope_positions,
    )

    cache = manifest["cache"]
    _, ids, attention, _ = validation_canvases(manifest)[-1]  # left-padded, half masked
    batch, length = ids.shape
    block, shift = cache["block_length"], cache["shift"]
    start = max(1, length - cache["window"])  # where generation starts at the window's length
    real = attention.astype(bool)
    positions = rope_positions(real, cache["positions"])
    blocks = block_ids(length, start, block)

    def both(method, *args, **kwargs):
        return getattr(reference, method)(*args, **kwargs), getattr(backend, method)(*args, **kwargs)

    def window(first, last, valid, rule, write=None):
        rows = backend.rows_for(last - first)
        queries = np.full((batch, rows), -1, dtype=np.int64)
        queries[:, : last - first] = np.arange(first, last)
        safe = np.where(queries >= 0, queries, 0)
        mask = cached_mask(rule, queries, valid, real, blocks)
        ref, got = both("cached_step", np.take_along_axis(ids, safe, 1),
                        np.take_along_axis(positions, safe, 1), mask, write)
        return _compare_rows(ref, got, queries >= 0)

    for rule in ("bidirectional", "block_causal", "causal"):
        for side in (reference, backend):
            side.reset_cache(batch, length)
        ref, got = both("prefill", ids, positions, canvas_mask(rule, real, blocks))
        yield f"prefill/{rule}", _compare_rows(ref, got, real)
        valid = np.zeros((batch, length), dtype=bool)
        if rule == "block_causal":
            valid[:, :start] = True
            first = start - shift
            yield "step/block_causal", window(first, start + block, valid, rule)
            yield "commit/block_causal", window(first, start + block, valid, rule,
                                                write=(shift, start, block))
            valid[:, start:start + block] = True
            last = min(start + 2 * block, length)
            if last > start + block:  # reads what the commit wrote
                yield "step-after-commit/block_causal", window(
                    start + block - shift, last, valid, rule)
        elif rule == "bidirectional":
            valid[:, : start - shift] = True
            yield "window/bidirectional", window(start - shift, length, valid, rule)
        else:
            valid[:, :start] = True
            yield "decode/causal", window(start, start + 1, valid, rule)


def run_validation(reference, backend, manifest: dict, progress=None) -> dict:
    """Compare ``backend`` (ONNX Runtime) with ``reference`` (a TorchBackend) on every case:
    the canvas graph, then (when the artifact has them) the cached graphs."""
    dtype = manifest.get("dtype", "fp32")
    bars = BARS.get(dtype, BARS["fp32"])
    results = []
    for name, ids, attention, masked in validation_canvases(manifest):
        if manifest["outputs"] == "logits":
            metrics = compare_logits(reference.logits(ids, attention)[masked],
                                     backend.logits(ids, attention)[masked])
        else:
            ref, got = reference.predict(ids, attention), backend.predict(ids, attention)
            metrics = compare_decode(
                (ref.topk_ids[masked], ref.topk_logprobs[masked], ref.neg_entropy[masked]),
                (got.topk_ids[masked], got.topk_logprobs[masked], got.neg_entropy[masked]))
        metrics["positions"] = int(masked.sum())
        results.append({"case": name, **metrics})
        if progress:
            progress(name, metrics)
    if manifest.get("cache"):
        for name, metrics in cached_cases(reference, backend, manifest):
            results.append({"case": name, **metrics})
            if progress:
                progress(name, metrics)
    passed = all(r["top1_agreement"] >= bars["top1_agreement"] and r["cosine_mean"] >= bars["cosine"]
                 for r in results)
    return {"passed": passed, "reference": f"PyTorch ({dtype}) on CPU", "bars": bars,
            "results": results}
