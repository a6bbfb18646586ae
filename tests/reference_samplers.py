"""Torch ports of the published unmasking loops, over full logits, for parity tests.

Ported from reading (not copying) three sources:

* ML-GSAI/LLaDA ``generate.py``: ``generate``, ``add_gumbel_noise``,
  ``get_num_transfer_tokens``.
* NVlabs/Fast-dLLM ``llada/generate.py``: ``generate`` with ``threshold``,
  ``get_transfer_index``, ``generate_with_prefix_cache`` and ``generate_with_dual_cache``
  (the last two over a ``CachedModel``: Fast-dLLM's ``model(x, past_key_values,
  replace_position)``).
* Dream ``generation_utils.py`` (as in NVlabs/Fast-dLLM ``dream/model``): ``_sample``
  for the origin / maskgit_plus / topk_margin / entropy algs, ``sample_tokens``,
  ``top_p_logits``, ``top_k_logits``.

Each loop takes ``logits_fn(x, attention_mask) -> [B, L, V]`` float32 logits following
the denoiser contract: row p predicts position p. Dream's one-position shift lives
inside our Dream model, so the Dream port does not shift again. The special ids are
arguments instead of LLaDA-8B's hard-coded 126081 (EOS) and 126348 (EoT). The
reference's unconditional ``torch.rand`` calls take an optional ``generator`` here.
Checked once against the original files run as they are (scratch script, not kept):
token for token on all three tiny families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_positions(values, k):
    """``torch.topk(values, k)`` indices, equal values in position order.

    torch leaves the order of equal values unspecified (its CPU topk returns [4, 7] as
    the top 2 of [.5, 1, .2, 1, 1, .3, 1, 1]), so with ties the reference has no single
    answer; this is one of its possible answers, and the order the runtime documents.
    Ties are real: confidence_eos_eot_inf scores every EOS / EoT candidate exactly 0.
    """
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def _record(history, x):
    if history is not None:
        history.append(x.clone())


# ---------------------------------------------------------------- LLaDA


def add_gumbel_noise(logits, temperature, generator=None):
    """exp(l) / (-log u)^T: its argmax is the argmax of l/T + Gumbel noise (float64)."""
    if temperature == 0:
        return logits  # the same tensor: see confidence_eos_eot_inf below
    logits = logits.to(torch.float64)
    uniform = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(uniform)) ** temperature


def get_num_transfer_tokens(mask_index, steps):
    """[B, steps] tokens per step: mask_count // steps, the remainder on the first."""
    mask_count = mask_index.sum(dim=1, keepdim=True)
    counts = torch.zeros(mask_count.shape[0], steps, dtype=torch.int64)
    counts += mask_count // steps
    remainder = mask_count % steps
    for row in range(mask_count.shape[0]):
        counts[row, : int(remainder[row])] += 1
    return counts


def _llada_logits(logits_fn, x, attention_mask, prompt_index, cfg_scale, mask_id):
    if cfg_scale <= 0:
        return logits_fn(x, attention_mask)
    unconditional = x.clone()
    unconditional[prompt_index] = mask_id
    both_mask = None if attention_mask is None else torch.cat([attention_mask] * 2)
    cond, uncond = torch.chunk(logits_fn(torch.cat([x, unconditional]), both_mask), 2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def llada_x0_confidence(
    logits,
    temperature,
    remasking,
    eos_id=None,
    eot_id=None,
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    generator=None,
):
    """One LLaDA step's candidates and confidences over [B, L, V] logits (edited in
    place, as in the reference)."""
    if logits_eos_inf:
        logits[:, :, eos_id] = -torch.inf
    noised = add_gumbel_noise(logits, temperature, generator)
    x0 = noised.argmax(dim=-1)
    if confidence_eos_eot_inf:
        # One chained statement in the reference; at temperature 0 `noised` IS `logits`,
        # so both EOS and EoT leave the softmax below, with noise only EoT.
        noised[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
    if remasking == "low_confidence":
        probs = F.softmax(logits, dim=-1)
        return x0, torch.gather(probs, -1, x0[..., None])[..., 0]
    if remasking == "random":
        return x0, torch.rand(x0.shape, generator=generator)
    raise NotImplementedError(remasking)


@torch.no_grad()
def llada_generate(
    logits_fn,
    prompt,
    attention_mask=None,
    *,
    steps,
    gen_length,
    block_length,
    mask_id,
    eos_id=None,
    eot_id=None,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    generator=None,
    history=None,
):
    """LLaDA ``generate``: semi-autoregressive blocks, returns the [B, P + gen] canvas
    (and appends the canvas after every step to ``history`` when given)."""
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    if attention_mask is not None:
        ones = torch.ones(batch, gen_length, dtype=attention_mask.dtype)
        attention_mask = torch.cat([attention_mask, ones], dim=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt_length + block * block_length
        end = start + block_length
        counts = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            mask_index = x == mask_id
            logits = _llada_logits(
                logits_fn, x, attention_mask, prompt_index, cfg_scale, mask_id
            )
            x0, x0_p = llada_x0_confidence(
                logits,
                temperature,
                remasking,
                eos_id,
                eot_id,
                logits_eos_inf,
                confidence_eos_eot_inf,
                generator,
            )
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x, dtype=torch.bool)
            for row in range(batch):
                chosen = top_positions(confidence[row], int(counts[row, step]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
            _record(history, x)
    return x


# ---------------------------------------------------------------- Fast-dLLM threshold


def get_transfer_index(
    logits,
    temperature,
    remasking,
    mask_index,
    x,
    num_transfer_tokens,
    threshold=None,
    generator=None,
):
    """Fast-dLLM's selection: the scheduled count, or with ``threshold`` every masked
    position at or above it and always the most confident one."""
    x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
    if remasking == "low_confidence":
        probs = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.gather(probs, -1, x0[..., None])[..., 0]
    elif remasking == "random":
        x0_p = torch.rand(x0.shape, generator=generator)
    else:
        raise NotImplementedError(remasking)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for row in range(confidence.shape[0]):
        count = int(num_transfer_tokens[row])
        chosen = top_positions(confidence[row], count)
        transfer[row, chosen] = True
        if threshold is not None:
            for rank in range(1, count):
                if confidence[row, chosen[rank]] < threshold:
                    transfer[row, chosen[rank]] = False
    return x0, transfer


@torch.no_grad()
def fast_dllm_generate(
    logits_fn,
    prompt,
    *,
    steps,
    gen_length,
    block_length,
    mask_id,
    temperature=0.0,
    remasking="low_confidence",
    threshold=None,
    history=None,
):
    """Fast-dLLM ``generate`` (no cache), one prompt [1, P]: (canvas, forwards)."""
    prompt_length = prompt.shape[1]
    x = torch.full((1, prompt_length + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    forwards = 0
    for block in range(num_blocks):
        start = prompt_length + block * block_length
        end = start + block_length
        counts = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        step = 0
        while True:
            forwards += 1
            if forwards > 2 * gen_length + steps:  # the reference itself would not stop
                raise RuntimeError("a position keeps proposing the mask token")
            mask_index = x == mask_id
            logits = logits_fn(x, None)
            mask_index[:, end:] = False
            scheduled = counts[:, step] if threshold is None else None
            x0, transfer = get_transfer_index(
                logits, temperature, remasking, mask_index, x, scheduled, threshold
            )
            x[transfer] = x0[transfer]
            _record(history, x)
            step += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, forwards


# ---------------------------------------------------------------- Fast-dLLM caches


class CachedModel:
    """Fast-dLLM's calling convention over one of our models (batch 1, no padding).

    ``full(x)`` is ``model(x, use_cache=True)``: logits and every layer's (keys, values)
    over all positions. ``with_past(x_tail, past)`` is ``model(x_tail, past_key_values)``:
    the tail's positions continue after the past, and attention runs over the past's keys
    followed by the tail's own (a concatenation). ``replacing(x_block, past, start)`` is
    ``model(x_block, past_key_values, replace_position)``: the block's keys and values take
    the place of slots start.. of the past, and attention runs over all of them. The model
    is our family forward; only how keys are combined is Fast-dLLM's, written here.
    """

    def __init__(self, model, bias_fn=None):
        self.model, self.bias_fn = model, bias_fn

    def _run(self, x, positions, keys_length, cache):
        visible = torch.ones(1, x.shape[1], keys_length, dtype=torch.bool)
        logits = self.model(x, positions=positions, visible=visible, cache=cache)
        return logits if self.bias_fn is None else logits + self.bias_fn(positions)

    def full(self, x):
        from dllm_export.models.layers import KVCache

        cache = KVCache()
        positions = torch.arange(x.shape[1])[None]
        return self._run(x, positions, x.shape[1], cache), cache.presents

    def with_past(self, x_tail, past):
        from dllm_export.models.layers import KVCache

        before = past[0][0].shape[2]
        positions = torch.arange(before, before + x_tail.shape[1])[None]
        return self._run(x_tail, positions, before + x_tail.shape[1], KVCache(past))

    def replacing(self, x_block, past, start):
        class Replace:  # Fast-dLLM's replace_position: the block's slots are overwritten
            def __init__(self):
                self.layer = 0

            def update_and_fetch(self, keys, values):
                old_keys, old_values = past[self.layer]
                self.layer += 1
                end = start + keys.shape[2]
                keys = torch.cat((old_keys[:, :, :start], keys, old_keys[:, :, end:]), dim=2)
                values = torch.cat((old_values[:, :, :start], values, old_values[:, :, end:]), 2)
                return keys, values

        positions = torch.arange(start, start + x_block.shape[1])[None]
        return self._run(x_block, positions, past[0][0].shape[2], Replace())


@torch.no_grad()
def fast_dllm_cached_generate(
    model: CachedModel,
    prompt,
    *,
    dual,
    steps,
    gen_length,
    block_length,
    mask_id,
    temperature=0.0,
    remasking="low_confidence",
    threshold=None,
    history=None,
):
    """Fast-dLLM ``generate_with_prefix_cache`` (``dual=False``) and
    ``generate_with_dual_cache`` (``dual=True``), one prompt [1, P]: (canvas, forwards)."""
    prompt_length = prompt.shape[1]
    x = torch.full((1, prompt_length + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    forwards = 0
    for block in range(num_blocks):
        start = prompt_length + block * block_length
        end = start + block_length
        counts = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        logits, past = model.full(x)  # the cache is written, and the first commit made
        mask_index = x == mask_id
        mask_index[:, end:] = False
        scheduled = counts[:, 0] if threshold is None else None
        x0, transfer = get_transfer_index(
            logits, temperature, remasking, mask_index, x, scheduled, threshold)
        x[transfer] = x0[transfer]
        _record(history, x)
        forwards += 1
        if not dual:
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
        step = 1
        while True:  # as in Fast-dLLM, one cached step runs even if the block is full
            forwards += 1
            if forwards > 2 * gen_length + steps:
                raise RuntimeError("a position keeps proposing the mask token")
            if dual:
                region = x[:, start:end]
                logits = model.replacing(region, past, start)
            else:
                region = x[:, start:]
                logits = model.with_past(region, past)
            mask_index = region == mask_id
            mask_index[:, block_length:] = False
            scheduled = counts[:, step] if threshold is None else None
            x0, transfer = get_transfer_index(
                logits, temperature, remasking, mask_index, region, scheduled, threshold)
            region[transfer] = x0[transfer]
            _record(history, x)
            if (x[:, start:end] == mask_id).sum() == 0:
                break
            step += 1
    return x, forwards


# ---------------------------------------------------------------- Dream


def top_p_logits(logits, top_p):
    """Keep the smallest prefix of the sorted distribution whose mass exceeds top_p."""
    sorted_logits, sorted_ids = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
    remove[..., 0] = False
    hidden = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_ids, remove)
    return logits.masked_fill(hidden, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k):
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits,
    temperature=0.0,
    top_p=None,
    top_k=None,
    margin_confidence=False,
    neg_entropy=False,
    generator=None,
):
    """Dream's ``sample_tokens`` over [N, V] logits: (confidence [N], x0 [N])."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:  # the reference draws with torch.distributions.Categorical
        x0 = torch.multinomial(probs, 1, generator=generator)[:, 0]
        confidence = torch.gather(probs, -1, x0[:, None])[:, 0]
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        ordered = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = ordered[:, 0] - ordered[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(
    logits_fn,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens,
    steps,
    mask_id,
    eps=1e-3,
    alg="origin",
    alg_temp=None,
    temperature=0.0,
    top_p=None,
    top_k=None,
    generator=None,
    history=None,
):
    """Dream ``diffusion_generate`` / ``_sample``; returns the [B, P + new] canvas
    (``history`` plays the reference's ``output_history``)."""
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    if attention_mask is not None and (attention_mask == 0).any():
        # The reference builds a 4-D query-and-key mask and positions cumsum - 1 from
        # this; our Dream model derives both from the 2-D mask.
        attention_mask = F.pad(attention_mask, (0, max_new_tokens), value=1)
    else:
        attention_mask = None  # the reference's "full" attention
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = logits_fn(x, attention_mask)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            transfer = torch.rand(x0.shape, generator=generator) < p_transfer
            _, x0[transfer] = sample_tokens(
                mask_logits[transfer], temperature, top_p, top_k, generator=generator
            )
            x[mask_index] = x0.clone()
            _record(history, x)
            continue
        confidence, x0 = sample_tokens(
            mask_logits,
            temperature,
            top_p,
            top_k,
            margin_confidence=alg == "topk_margin",
            neg_entropy=alg == "entropy",
            generator=generator,
        )
        num_mask_token = (
            mask_index.sum() / mask_index.shape[0]
        )  # float32 mean over rows
        if i < steps - 1:
            count = int(num_mask_token * (1 - s / t))
        else:
            count = int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if count > 0:
            if alg_temp is None or alg_temp == 0:
                transfer_index = top_positions(full_confidence, count)
            else:
                weights = F.softmax(full_confidence / alg_temp, dim=-1)
                transfer_index = torch.multinomial(
                    weights, num_samples=count, generator=generator
                )
            candidates = torch.zeros_like(x) + mask_id
            candidates[mask_index] = x0.clone()
            rows = torch.arange(x.shape[0])[:, None].expand_as(transfer_index)
            x[rows, transfer_index] = candidates[rows, transfer_index]
        _record(history, x)
    return x


# ---------------------------------------------------------------- callers


def left_padded(prompts, pad_id):
    """Prompts as the reference callers build them: left-padded ids, attention mask."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference_steps(
    logits_fn, prompts, *, mask_id, eos_id, eot_id, pad_id, algorithm="llada", **options
):
    """Run a port like its callers do, on token-id prompts; returns the canvas after
    every step (one forward each). Dream for algorithm "dream", Fast-dLLM when a
    threshold is set (one prompt), LLaDA otherwise; options use the runtime's names."""
    ids, mask = left_padded(prompts, pad_id)
    history = []
    if algorithm == "dream":
        options["max_new_tokens"] = options.pop("gen_length")
        dream_generate(
            logits_fn, ids, mask, mask_id=mask_id, history=history, **options
        )
    elif options.get("threshold") is not None:
        fast_dllm_generate(logits_fn, ids, mask_id=mask_id, history=history, **options)
    else:
        llada_generate(
            logits_fn,
            ids,
            mask,
            mask_id=mask_id,
            eos_id=eos_id,
            eot_id=eot_id,
            history=history,
            **options,
        )
    return history


# ---------------------------------------------------------------- LLaDA2


def _llada2_schedule(block_length, steps):
    return [block_length // steps + (1 if s < block_length % steps else 0) for s in range(steps)]


@torch.no_grad()
def llada2_generate(logits_fn, prompt, *, gen_length, block_length, steps, threshold,
                    mask_id, eos_id, minimal_topk=1, editing_threshold=None,
                    max_post_steps=16, num_to_transfer=1, eos_early_stop=False, history=None):
    """LLaDA2.0 ``generate`` (dllm at HEAD: argmax at temperature 0) and, with
    ``editing_threshold``, LLaDA2.1's; one prompt [1, P], no cache: every step runs
    ``logits_fn(x[:, :end], end)`` (the block-causal window up to the block's end).
    Returns the full canvas [1, NB * L]."""
    P, L = prompt.shape[1], block_length
    steps = min(steps, gen_length // minimal_topk)
    blocks = -(-(P + gen_length) // L)
    x = torch.full((1, blocks * L), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    counts = _llada2_schedule(L, steps)
    for b in range(P // L, blocks):
        start, end = b * L, (b + 1) * L
        block = x[:, start:end]
        prompt_mask = torch.arange(start, end) < P
        if editing_threshold is None:
            for s in range(steps):
                active = block == mask_id
                if not active.any():
                    break
                logits = logits_fn(x[:, :end], end)[:, -L:]
                probs = F.softmax(logits.double(), -1)
                x0 = logits.argmax(-1)
                p = probs.gather(-1, x0[..., None])[..., 0]
                confidence = torch.where(active, p, -torch.inf)
                high = confidence > threshold
                n = min(counts[s], int(active.sum()))
                commit = high if int(high.sum()) >= n else torch.zeros_like(high)
                if int(high.sum()) < n:
                    commit[0, top_positions(confidence[0], n)] = True
                block[commit] = x0[commit]
                _record(history, x)
                if eos_early_stop and (x0[commit] == eos_id).any():
                    eos = (x[0, P:] == eos_id).nonzero()
                    if len(eos) and not (x[0, P : P + int(eos[0])] == mask_id).any():
                        return x
            if (x[0, P:end] == eos_id).any():
                break
            continue
        post = 0
        while True:
            old = block.clone()
            active = old == mask_id
            if not active.any():
                post += 1
            if post > max_post_steps:
                break
            logits = logits_fn(x[:, :end], end)[:, -L:]
            probs = F.softmax(logits.double(), -1)
            x0 = logits.argmax(-1)
            p = probs.gather(-1, x0[..., None])[..., 0]
            commit = torch.zeros_like(active)
            if active.any():
                confidence = torch.where(active, p, -torch.inf)
                high = (confidence > threshold) & active
                if int(high.sum()) >= num_to_transfer:
                    commit = high
                else:
                    commit[0, top_positions(confidence[0], min(num_to_transfer, int(active.sum())))] = True
            edits = ~active & ~prompt_mask[None] & (p > editing_threshold) & (x0 != old)
            block[commit | edits] = x0[commit | edits]
            _record(history, x)
            if not active.any() and not edits.any():
                break
        if eos_early_stop:
            generated = x[0, P:end]
            if not (generated == mask_id).any() and (generated == eos_id).any():
                break
    return x
