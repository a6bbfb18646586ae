"""ZAYA1 (CCA attention, top-1 router with a skip expert) against transformers'
``ZayaForCausalLM``, its cache, the segmented convolution, and draft-and-verify (TiDAR)
decoding, whose lossless sampler must reproduce greedy autoregressive decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.references import PositionBiased

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOLERANCE = 1e-5  # float32 logits, max abs difference (measured: 2e-7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dllm_export.models.tiny import make_tiny

    return make_tiny("zaya1", tmp_path_factory.mktemp("zaya1") / "ckpt", dtype="float32")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from dllm_export.models import load_model

    return load_model(checkpoint)[0]


def _causal_cached(model, ids, prefix: int, capacity: int):
    """Prefill ``prefix`` tokens, then one token per call over the cache."""
    from dllm_export.models.layers import KVCache

    kinds = len(model.cache_kinds)
    cache = KVCache(None, kinds)
    rows = [model(ids[:, :prefix], positions=torch.arange(prefix)[None],
                  visible=torch.tril(torch.ones(prefix, prefix, dtype=torch.bool))[None],
                  cache=cache)]
    past = [tuple(torch.cat([t, t.new_zeros(*t.shape[:2], capacity - prefix, t.shape[3])], 2)
                  for t in states) for states in cache.presents]
    for p in range(prefix, ids.shape[1]):
        visible = torch.zeros(1, 1, capacity + 1, dtype=torch.bool)
        visible[0, 0, :p] = True
        visible[0, 0, capacity] = True
        cache = KVCache(past, kinds)
        rows.append(model(ids[:, p:p + 1], positions=torch.tensor([[p]]), visible=visible,
                          cache=cache))
        for states, new in zip(past, cache.presents, strict=True):
            for state, value in zip(states, new, strict=True):
                state[:, :, p:p + 1] = value
    return torch.cat(rows, dim=1)


def test_full_and_cached_causal_decoding_match_transformers(checkpoint, loaded):
    from transformers import ZayaForCausalLM

    reference = ZayaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        full = loaded(ids)
        cached = _causal_cached(loaded, ids, prefix=10, capacity=24)
    assert (full - want).abs().max().item() < TOLERANCE
    assert (cached - want).abs().max().item() < TOLERANCE
    # the checkpoint exercises the skip class (weight 0) and the experts both
    layer = loaded.model.layers[1]
    hidden = torch.randn(512, loaded.args.hidden_size, generator=torch.Generator().manual_seed(2))
    _, expert_ids, _ = layer.mlp.gate.route(layer.post_attention_layernorm(hidden), None)
    probs = torch.softmax(layer.mlp.gate.router_mlp(layer.mlp.gate.down_proj(
        layer.post_attention_layernorm(hidden))), -1)
    winners = torch.topk(probs + layer.mlp.gate.balancing_biases, 1).indices
    assert (winners == loaded.args.num_experts).any() and (winners < loaded.args.num_experts).any()
    assert expert_ids.max() < loaded.args.num_experts


def test_parameter_count_matches_transformers(checkpoint, loaded):
    from transformers import ZayaForCausalLM

    from dllm_export.checkpoint import read_config
    from dllm_export.model_shape import model_shape
    from dllm_export.models.zaya1 import ModelArgs, parameter_counts

    reference = ZayaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    config, _ = read_config(checkpoint)
    want = sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for name, b in reference.named_buffers() if "balancing" in name)
    assert parameter_counts(ModelArgs.from_dict(config))["total"] == want
    assert model_shape(config).total_parameters() == want


def _draft_rows(model, ids, rows_positions, visible, past, kinds):
    from dllm_export.models.layers import KVCache

    with torch.no_grad():
        return model(ids, positions=rows_positions, visible=visible, cache=KVCache(past, kinds))


def test_convolution_reads_predecessors_by_the_mask_not_by_row_order(loaded, monkeypatch):
    """A draft-and-verify call: one pending token, padding rows, then the mask block. The
    mask rows' logits must equal those of the same call without the padding rows (their
    predecessor is the pending token, wherever it sits); with a convolution over row order
    they read the padding rows instead, and this test fails."""
    from dllm_export.models import zaya1
    from dllm_export.runtime.attention import draft_verify_mask

    prefix, capacity, block = 12, 40, 4
    ids = torch.randint(0, 300, (1, prefix + 1), generator=torch.Generator().manual_seed(3))
    kinds = len(loaded.cache_kinds)
    from dllm_export.models.layers import KVCache

    cache = KVCache(None, kinds)
    with torch.no_grad():
        loaded(ids[:, :prefix], positions=torch.arange(prefix)[None],
               visible=torch.tril(torch.ones(prefix, prefix, dtype=torch.bool))[None], cache=cache)
    past = [tuple(torch.cat([t, t.new_zeros(*t.shape[:2], capacity - prefix, t.shape[3])], 2)
                  for t in states) for states in cache.presents]
    valid = np.zeros((1, capacity), dtype=bool)
    valid[0, :prefix] = True
    real = np.ones((1, capacity), dtype=bool)
    masks = np.arange(prefix + 1, prefix + 1 + block)

    def call(rows, mask_row):
        visible = draft_verify_mask(np.array([prefix]), masks, rows, valid, real, mask_row)
        tokens = torch.zeros(1, rows, dtype=torch.long)
        positions = torch.zeros(1, rows, dtype=torch.long)
        tokens[0, 0], positions[0, 0] = ids[0, prefix], prefix
        tokens[0, mask_row:mask_row + block] = 301
        positions[0, mask_row:mask_row + block] = torch.from_numpy(masks)
        out = _draft_rows(loaded, tokens, positions, torch.from_numpy(visible), past, kinds)
        return out[0, 0], out[0, mask_row:mask_row + block]

    pending_a, drafts_a = call(2 * block, block)  # padding rows 1..block-1 in between
    pending_b, drafts_b = call(1 + block, 1)  # the mask block right after the pending row
    assert (pending_a - pending_b).abs().max() < TOLERANCE
    assert (drafts_a - drafts_b).abs().max() < TOLERANCE

    def by_row_order(positions, key_positions, visible, taps):  # the trap: neighbours by row
        past_slots = visible.shape[-1] - positions.shape[1]
        rows = torch.arange(positions.shape[1])
        keys = torch.arange(visible.shape[-1])
        want = past_slots + rows[None, :, None] - torch.arange(1, taps + 1)[:, None, None]
        return (keys[None, None, None, :] == want[None, ..., None]).float().squeeze(-2)

    monkeypatch.setattr(zaya1, "predecessors", by_row_order)
    _, drafts_c = call(2 * block, block)
    assert (drafts_c - drafts_b).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["zaya1", "dream"])
def test_lossless_tidar_reproduces_greedy_autoregressive_decoding(tmp_path, family):
    """Every shipped family with a next-token mode: at temperature 0 the lossless sampler
    commits exactly the tokens of greedy autoregressive decoding (PyTorch reference), for
    several block lengths."""
    from dllm_export.models import load_model
    from dllm_export.models.tiny import make_tiny
    from dllm_export.runtime.autoregressive import greedy_decode
    from dllm_export.runtime.backends.torch_backend import TorchBackend
    from dllm_export.runtime.tidar import tidar_decode

    model = load_model(make_tiny(family, tmp_path / "ckpt", dtype="float32"))[0]
    mask_id = model.args.vocab_size - 1
    backend = TorchBackend(PositionBiased(model, mask_id, seed=4, rows=128), (1,), topk=8)
    prompt = list(range(5, 17))
    want = greedy_decode(backend, prompt, 40, pad_id=0).tokens
    assert len(set(want)) > 5  # a sequence worth comparing
    draft_shift = family == "dream"
    for block in (1, 4, 16):
        got, stats = tidar_decode(backend, prompt, 40, block, pad_id=0, mask_id=mask_id,
                                  draft_shift=draft_shift, early_exit=False)
        assert got == want, block
        assert sum(stats.accepted) == 40
        mixed, _ = tidar_decode(backend, prompt, 40, block, pad_id=0, mask_id=mask_id,
                                sampler="logit-mix", mix=0.0, draft_shift=draft_shift,
                                early_exit=False)
        assert mixed == want  # logit-mix at weight 0 is the lossless rule


def test_tidar_refuses_a_family_without_next_token_predictions():
    from dllm_export.errors import DllmExportError
    from dllm_export.families import family
    from dllm_export.runtime.generate import SamplerConfig, Special, _tidar

    with pytest.raises(DllmExportError, match="no causal next-token mode"):
        _tidar(None, [[1]], np.zeros((1, 4), dtype=np.int64), None, 1,
               SamplerConfig(algorithm="tidar", block_length=4), Special(0, 1, None, 1),
               family("llada"), None)


@pytest.mark.slow
def test_export_runs_draft_and_verify_on_onnx_runtime(checkpoint, tmp_path):
    """The export validates every cached graph (draft included) against PyTorch, and
    lossless TiDAR on ONNX Runtime commits the tokens greedy decoding does there."""
    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.runtime.autoregressive import greedy_decode
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.tidar import tidar_decode

    manifest = export_model(checkpoint, tmp_path / "art", ExportOptions(seq_len=64, block_length=8))
    assert manifest["valid"]
    assert set(manifest["cache"]["graphs"]) == {"prefill", "draft", "decode"}
    assert manifest["cache"]["kinds"] == ["conv", "delayed", "key", "value"]
    assert manifest["generation_defaults"]["algorithm"] == "tidar"
    cases = {r["case"] for r in manifest["validation"]["results"]}
    assert {"draft/causal", "draft-after-commit/causal"} <= cases
    backend = OrtBackend(tmp_path / "art", manifest)
    prompt = list(range(5, 17))
    want = greedy_decode(backend, prompt, 40, pad_id=0).tokens
    got, stats = tidar_decode(backend, prompt, 40, 8, pad_id=0, mask_id=300, early_exit=False)
    assert got == want and stats.forwards <= 40


@pytest.mark.skipif(not (REFERENCE / "zaya1-8b").is_dir(), reason="no shared reference")
def test_plan_fits_zaya1_8b_in_int4_on_an_orin_nano():
    from dllm_export.device_profiles import load_profile
    from dllm_export.export.plan import plan_model

    plan = plan_model(REFERENCE / "zaya1-8b", load_profile("jetson-orin-nano-8gb"))
    rows = {row.precision: row for row in plan.rows}
    assert rows["int4"].fits and not rows["fp16"].fits
    assert 8.4e9 < plan.work.shape.total_parameters() < 9.0e9  # transformers' class: 8.84 B


def test_a_diffusion_section_in_config_sets_the_drafting_defaults(checkpoint, tmp_path):
    import json
    import shutil

    from dllm_export.checkpoint import open_checkpoint, resolve_special_tokens
    from dllm_export.errors import DllmExportError
    from dllm_export.runtime.api import sampler_defaults
    from dllm_export.runtime.tokenizer import TextTokenizer

    copy = Path(shutil.copytree(checkpoint, tmp_path / "converted"))
    config = json.loads((copy / "config.json").read_text())
    config["diffusion"] = {"block_length": 8, "mask_token_id": 300,
                           "tidar_sampler": "logit-mix", "mix": 0.25}
    (copy / "config.json").write_text(json.dumps(config))
    opened = open_checkpoint(copy)
    defaults = sampler_defaults(opened.family, opened.generation_config)
    assert (defaults.algorithm, defaults.block_length, defaults.tidar_sampler,
            defaults.mix) == ("tidar", 8, "logit-mix", 0.25)
    special = resolve_special_tokens(opened.config, opened.generation_config,
                                     TextTokenizer(copy), copy)
    assert special.mask_id == 300
    config["diffusion"] = [8]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmExportError, match="field 'diffusion' must be an object"):
        open_checkpoint(copy)
