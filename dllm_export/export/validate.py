"""Numeric validation of an export: ONNX Runtime CPU against the PyTorch model.

Inputs are canvases like the ones decoding produces: a prompt followed by a response masked
at several ratios, plus a left-padded case. Metrics are taken on masked positions only
(those are the predictions the sampler uses).

Two checks per case, stated so that a correct export cannot fail them:

* top-1 agreement up to ties: a position agrees when both sides pick the same token, or
  when the reference scores the export's pick within the dtype's tolerance of its own best
  (a near-uniform random model has near-ties everywhere; rounding may break them either
  way, which is not an error);
* the log-probability difference of the tokens both sides rank in their top K: the
  maximum (fp32) or the 99th percentile (fp16 / bf16, whose kernels accumulate in other
  orders) against the dtype's tolerance.

Bars: fp32 agreement >= 0.999 with tolerance 1e-3 (float32 rounding of a log-softmax is
about 1e-6); fp16 >= 0.99, 0.05; bf16 >= 0.98, 0.15 (8 bits of mantissa). The mean cosine
of the top-K distributions is reported beside, not judged: a near-uniform model's cosine of
aligned top-K vectors drops to 0.998 on a rounding-level difference that swaps which
near-tied tokens make the top K. A failed validation names the case and the check.
"""

from __future__ import annotations

import numpy as np

BARS = {
    "fp32": {"top1_agreement": 0.999, "logprob_tolerance": 1e-3, "percentile": 100},
    "fp16": {"top1_agreement": 0.99, "logprob_tolerance": 0.05, "percentile": 99},
    "bf16": {"top1_agreement": 0.98, "logprob_tolerance": 0.15, "percentile": 99},
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, tolerance: float = 1e-3,
                   percentile: float = 100) -> dict:
    """Rows are masked positions: [N, V] each."""
    cos = _cosine(ref.astype(np.float64), got.astype(np.float64))
    ref_lp, got_lp = _log_softmax(ref), _log_softmax(got)
    pick = got_lp.argmax(-1)
    rows = np.arange(len(pick))
    near = ref_lp.max(-1) - ref_lp[rows, pick] <= tolerance
    diff = np.abs(ref_lp - got_lp)
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "logprob_diff": float(np.percentile(diff.max(-1), percentile)),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((ref.argmax(-1) == pick).mean()),
        "top1_agreement_ties": float(near.mean()),
    }


def compare_decode(ref: tuple, got: tuple, tolerance: float = 1e-3,
                   percentile: float = 100) -> dict:
    """Decode-head outputs at masked positions: ids [N, K], logprobs [N, K], entropy [N].

    The cosine is between the two top-K probability vectors aligned by token id (a token
    missing from one side counts as probability 0 there). ``logprob_diff`` compares the
    tokens both sides rank in their top K (the ``percentile`` of the per-position maximum).
    """
    ref_ids, ref_lp, ref_ent = ref
    got_ids, got_lp, got_ent = got
    union = np.concatenate([ref_ids, got_ids], axis=1)  # [N, 2K]

    def probs_on(ids, logprobs):
        hit = union[:, :, None] == ids[:, None, :]  # [N, 2K, K]
        return (hit * np.exp(logprobs.astype(np.float64))[:, None, :]).sum(-1)

    cos = _cosine(probs_on(ref_ids, ref_lp), probs_on(got_ids, got_lp))
    same = ref_ids[:, 0] == got_ids[:, 0]
    shared = ref_ids[:, :, None] == got_ids[:, None, :]  # [N, K, K]
    gap = np.abs(ref_lp[:, :, None].astype(np.float64) - got_lp[:, None, :])
    per_row = np.where(shared, gap, 0.0).max(axis=(1, 2))
    # the reference's log-probability of the export's pick (when in its top K)
    pick = got_ids[:, :1] == ref_ids  # [N, K]
    picked = np.where(pick, ref_lp, -np.inf).max(-1)
    near = ref_lp[:, 0] - picked <= tolerance
    return {
        "max_abs_diff": float(np.abs(ref_lp[same, 0] - got_lp[same, 0]).max()) if same.any() else float("inf"),
        "logprob_diff": float(np.percentile(per_row, percentile)) if len(per_row) else 0.0,
        "max_entropy_diff": float(np.abs(ref_ent - got_ent).max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float(same.mean()),
        "top1_agreement_ties": float(near.mean()),
    }


def failed_checks(result: dict, bars: dict) -> list[str]:
    """The checks a case misses, each with its value and bar."""
    failed = []
    if result["top1_agreement_ties"] < bars["top1_agreement"]:
        failed.append(f"top-1 agreement (up to ties) {result['top1_agreement_ties']:.4f} < "
                      f"{bars['top1_agreement']}")
    if result["logprob_diff"] > bars["logprob_tolerance"]:
        which = "max" if bars["percentile"] == 100 else f"p{bars['percentile']}"
        failed.append(f"{which} log-probability difference {result['logprob_diff']:.3g} > "
                      f"{bars['logprob_tolerance']}")
    return failed


def _compare_rows(ref, got, rows, bars) -> dict:
    metrics = compare_decode(
        (ref.topk_ids[rows], ref.topk_logprobs[rows], ref.neg_entropy[rows]),
        (got.topk_ids[rows], got.topk_logprobs[rows], got.neg_entropy[rows]),
        bars["logprob_tolerance"], bars["percentile"])
    return {**metrics, "positions": int(rows.sum())}


def cached_cases(reference, backend, manifest: dict, bars: dict):
    """(name, metrics) of the cached graphs, each call made on both backends with the same
    inputs: a prefill under each rule, then a block step over the cache, a commit that
    writes the block, the next block's step (which reads what was written), a prefix
    window, and a causal decode step. Compared on real query rows."""
    from dllm_export.runtime.attention import (
        block_ids,
        cached_mask,
        canvas_mask,
        draft_verify_mask,
        rope_positions,
    )

    cache = manifest["cache"]
    graphs = cache.get("graphs") or {}
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
        return _compare_rows(ref, got, queries >= 0, bars)

    if "rows" in graphs:  # the head over chosen rows of an unpadded canvas: the first
        # (row 0 keeps its own prediction in a shifted family), a block at the generation's
        # start, the last row (the graph's rows moved back from the canvas' end)
        rows = graphs["rows"]["queries"]
        _, plain, everywhere, _ = validation_canvases(manifest)[1]
        for name, first, count in (("first", 0, rows), ("block", start, min(rows, length - start)),
                                   ("last", length - 1, 1)):
            ref, got = both("predict_rows", plain, everywhere, first, count)
            yield f"rows/{name}", _compare_rows(ref, got, np.ones((batch, count), bool), bars)
    for rule in ("bidirectional", "block_causal", "causal"):
        for side in (reference, backend):
            side.reset_cache(batch, length)
        ref, got = both("prefill", ids, positions, canvas_mask(rule, real, blocks))
        yield f"prefill/{rule}", _compare_rows(ref, got, real, bars)
        valid = np.zeros((batch, length), dtype=bool)
        if rule == "block_causal" and "step" in graphs:
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
        elif rule == "bidirectional" and "window" in graphs:
            valid[:, : start - shift] = True
            yield "window/bidirectional", window(start - shift, length, valid, rule)
        elif rule == "causal":
            valid[:, :start] = True
            yield "decode/causal", window(start, start + 1, valid, rule)
            if "draft" in graphs:  # pending block (causal) + mask block, then one reading it
                # early enough that both calls fit the canvas (a short canvas's window
                # start leaves no room for two blocks after it)
                draft_start = max(1, min(start, length - 3 * block))
                valid = np.zeros((batch, length), dtype=bool)
                valid[:, :draft_start] = True
                for name, first in (("draft", draft_start),
                                    ("draft-after-commit", draft_start + block)):
                    if first + 2 * block > length:
                        break
                    rows = backend.rows_for(2 * block)
                    pending, masks = np.arange(first, first + block), np.arange(first + block, first + 2 * block)
                    query = np.full((batch, rows), -1, dtype=np.int64)
                    query[:, :block], query[:, block:2 * block] = pending, masks
                    safe = np.where(query >= 0, query, 0)
                    mask = np.concatenate([draft_verify_mask(pending, masks, rows, valid[b:b + 1],
                                                             real[b:b + 1], block)
                                           for b in range(batch)])
                    ref, got = both("cached_step", np.take_along_axis(ids, safe, 1),
                                    np.take_along_axis(positions, safe, 1), mask)
                    yield f"{name}/causal", _compare_rows(ref, got, query >= 0, bars)
                    for side in (reference, backend):
                        side.commit((0, first, block))
                    valid[:, first:first + block] = True


def run_validation(reference, backend, manifest: dict, progress=None) -> dict:
    """Compare ``backend`` (ONNX Runtime) with ``reference`` (a TorchBackend) on every case:
    the canvas graph, then (when the artifact has them) the cached graphs."""
    dtype = manifest.get("dtype", "fp32")
    bars = BARS.get(dtype, BARS["fp32"])
    results = []
    for name, ids, attention, masked in validation_canvases(manifest):
        if manifest["outputs"] == "logits":
            metrics = compare_logits(reference.logits(ids, attention)[masked],
                                     backend.logits(ids, attention)[masked],
                                     bars["logprob_tolerance"], bars["percentile"])
        else:
            ref, got = reference.predict(ids, attention), backend.predict(ids, attention)
            metrics = _compare_rows(ref, got, masked, bars)
        metrics["positions"] = int(masked.sum())
        results.append({"case": name, **metrics})
        if progress:
            progress(name, metrics)
    if manifest.get("cache"):
        for name, metrics in cached_cases(reference, backend, manifest, bars):
            results.append({"case": name, **metrics})
            if progress:
                progress(name, metrics)
    for result in results:
        result["failed"] = failed_checks(result, bars)
    return {"passed": not any(r["failed"] for r in results),
            "reference": f"PyTorch ({dtype}) on CPU", "bars": bars, "results": results}
