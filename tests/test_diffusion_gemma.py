"""DiffusionGemma against transformers' ``DiffusionGemmaForBlockDiffusion`` on the same tiny
checkpoint in float32: the encoder (causal prefill writing the cache), the decoder (canvas
over the cached prefix, with and without a self-conditioning signal), the commit pass and
the next canvas after it; the checkpoint layout; parameter counts; ``plan`` for the
published 26B-A4B config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_export.errors import DllmExportError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "diffusiongemma-26b-a4b"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(),
                                     reason="../shared/reference is not present")
TOLERANCE = 1e-5  # float32 soft-capped logits, max abs difference (measured: about 3e-6)
PROMPT, CANVAS = 12, 16  # the prompt is longer than the tiny sliding window (8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dllm_export.models.tiny import make_tiny

    return make_tiny("diffusion-gemma", tmp_path_factory.mktemp("dgemma") / "ckpt",
                     dtype="float32")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from dllm_export.models import load_model

    return load_model(checkpoint)[0]


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import DiffusionGemmaForBlockDiffusion

    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(checkpoint), dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True)
    return model.eval(), info


def _tokens(model, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, shape, generator=generator)


def _report(ours, theirs):
    difference = (ours - theirs).abs().max().item()
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"max abs difference {difference:.2e}, top-1 agreement {agreement:.4f}")
    return difference, agreement


def _hf_encoder_logits(reference, ids, cache):
    hidden = reference.model.encoder(input_ids=ids, cache=cache).last_hidden_state
    logits = reference.lm_head(hidden).float()
    cap = reference.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def _prefill(loaded, prompt):
    from dllm_export.models.layers import KVCache

    length = prompt.shape[1]
    cache = KVCache(None)
    logits = loaded.encode(prompt, torch.arange(length)[None].expand(prompt.shape[0], -1),
                           torch.tril(torch.ones(length, length, dtype=torch.bool))[None]
                           .expand(prompt.shape[0], -1, -1), cache)
    return logits, cache.presents


def _canvas_visibility(batch, past, length):
    return torch.ones(batch, length, past + length, dtype=torch.bool)


def _positions(batch, start, length):
    return torch.arange(start, start + length)[None].expand(batch, -1)


def test_checkpoint_is_the_layout_transformers_writes(checkpoint, reference, tmp_path):
    from dllm_export.checkpoint import open_checkpoint

    model, info = reference
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.save_pretrained(tmp_path / "resaved")
    written = set(open_checkpoint(tmp_path / "resaved").weight_map)
    assert written == set(open_checkpoint(checkpoint).weight_map)
    assert any(name.startswith("model.encoder.vision_tower.") for name in written)


def test_encoder_logits_match_transformers(loaded, reference):
    from transformers.cache_utils import DynamicCache

    model, _ = reference
    prompt = _tokens(loaded, (2, PROMPT), 1)
    with torch.no_grad():
        theirs = _hf_encoder_logits(model, prompt, DynamicCache(config=model.config.text_config))
        ours_plain = loaded(prompt)
        ours_cached, _ = _prefill(loaded, prompt)
    for ours in (ours_plain, ours_cached):
        difference, agreement = _report(ours, theirs)
        assert difference < TOLERANCE and agreement == 1.0


def test_decoder_logits_match_transformers_with_and_without_self_conditioning(loaded,
                                                                               reference):
    from transformers.cache_utils import DynamicCache

    from dllm_export.models.layers import KVCache

    model, _ = reference
    prompt, canvas = _tokens(loaded, (2, PROMPT), 2), _tokens(loaded, (2, CANVAS), 3)
    signal = 3.0 * torch.randn(2, CANVAS, loaded.args.vocab_size,
                               generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        _hf_encoder_logits(model, prompt, cache)
        first = model(cache=cache, decoder_input_ids=canvas).logits
        second = model(cache=cache, decoder_input_ids=canvas,
                       self_conditioning_logits=first).logits
        arbitrary = model(cache=cache, decoder_input_ids=canvas,
                          self_conditioning_logits=signal).logits
        _, past = _prefill(loaded, prompt)
        where = (_positions(2, PROMPT, CANVAS), _canvas_visibility(2, PROMPT, CANVAS))
        ours_first = loaded.denoise(canvas, *where, KVCache(past))
        ours_second = loaded.denoise(canvas, *where, KVCache(past), previous_logits=ours_first)
        ours_arbitrary = loaded.denoise(canvas, *where, KVCache(past), previous_logits=signal)
    for ours, theirs in ((ours_first, first), (ours_second, second),
                         (ours_arbitrary, arbitrary)):
        difference, agreement = _report(ours, theirs)
        assert difference < TOLERANCE and agreement == 1.0
    # the signal matters, and the decoder differs from the encoder on the same tokens
    assert (ours_second - ours_first).abs().max() > 1e-2
    assert (ours_arbitrary - ours_second).abs().max() > 1e-2


def test_commit_pass_and_the_next_canvas_match_transformers(loaded, reference):
    """The accepted canvas goes through the encoder with the cache (causal, writing its
    keys); the next canvas's decoder then reads prompt + committed canvas (28 slots, past
    the window of 8)."""
    from transformers.cache_utils import DynamicCache

    from dllm_export.models.layers import KVCache

    model, _ = reference
    prompt, accepted = _tokens(loaded, (2, PROMPT), 5), _tokens(loaded, (2, CANVAS), 6)
    following = _tokens(loaded, (2, CANVAS), 7)
    with torch.no_grad():
        cache = DynamicCache(config=model.config.text_config)
        _hf_encoder_logits(model, prompt, cache)
        committed = _hf_encoder_logits(model, accepted, cache)
        nxt = model(cache=cache, decoder_input_ids=following).logits
        _, past = _prefill(loaded, prompt)
        own = torch.tril(torch.ones(CANVAS, CANVAS, dtype=torch.bool))
        visible = torch.cat((torch.ones(CANVAS, PROMPT, dtype=torch.bool), own), dim=1)
        commit = KVCache(past)
        ours_committed = loaded.encode(accepted, _positions(2, PROMPT, CANVAS),
                                       visible[None].expand(2, -1, -1), commit)
        grown = [tuple(torch.cat((old, new), dim=2) for old, new in zip(a, b, strict=True))
                 for a, b in zip(past, commit.presents, strict=True)]
        start = PROMPT + CANVAS
        ours_next = loaded.denoise(following, _positions(2, start, CANVAS),
                                   _canvas_visibility(2, start, CANVAS), KVCache(grown))
    for ours, theirs in ((ours_committed, committed), (ours_next, nxt)):
        difference, agreement = _report(ours, theirs)
        assert difference < TOLERANCE and agreement == 1.0


def test_sliding_window_matters(loaded):
    """A window wide enough to see everything changes the logits: the rule is exercised."""
    import copy

    prompt = _tokens(loaded, (1, PROMPT), 8)
    wide = copy.copy(loaded)
    wide.args = copy.copy(loaded.args)
    wide.args.sliding_window = 1000
    with torch.no_grad():
        assert (loaded(prompt) - wide(prompt)).abs().max() > 1e-3


def test_parameter_counts_match_transformers(loaded, reference):
    from dllm_export.model_shape import model_shape
    from dllm_export.models import diffusion_gemma

    model, _ = reference
    text = sum(p.numel() for name, p in model.named_parameters()
               if not diffusion_gemma.ignored(name))
    counts = diffusion_gemma.parameter_counts(loaded.args)
    assert counts["total"] == text == sum(p.numel() for p in loaded.parameters())
    tiny = diffusion_gemma.tiny_config(loaded.args.vocab_size, {"eos": 1, "bos": 2})
    assert model_shape(tiny).total_parameters() == counts["total"]


@needs_reference
def test_26b_a4b_parameters_match_transformers_and_the_published_size():
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dllm_export.model_shape import model_shape
    from dllm_export.models import diffusion_gemma

    config = json.loads((REFERENCE / "config.json").read_text())
    counts = diffusion_gemma.parameter_counts(diffusion_gemma.ModelArgs.from_dict(config))
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**config))
    text = sum(p.numel() for name, p in model.named_parameters()
               if not diffusion_gemma.ignored(name))
    assert counts["total"] == text == model_shape(config).total_parameters()
    assert 25.0e9 < counts["total"] < 25.5e9 and 3.7e9 < counts["active"] < 3.9e9


@needs_reference
def test_plan_for_26b_a4b_int4_fits_agx_orin_and_thor_not_orin_nx():
    from dllm_export.device_profiles import load_profile
    from dllm_export.export.plan import plan_model

    for name in ("jetson-agx-orin-64gb", "jetson-agx-thor"):
        plan = plan_model(REFERENCE, load_profile(name), precision="int4", seq_len=256,
                          cache=True)
        assert plan.fits, name
        assert 12e9 < plan.chosen.weight_bytes < 15e9  # about 13.2 GiB
    nx = plan_model(REFERENCE, load_profile("jetson-orin-nx-16gb"), precision="int4",
                    seq_len=256, cache=True)
    assert not nx.fits
    assert not any(row.fits for row in nx.rows)  # no precision fits at any canvas
    assert any("no sequence length fits int4" in line for line in nx.suggestions)


def test_bad_config_is_one_line(tmp_path):
    from dllm_export.models import diffusion_gemma

    with pytest.raises(DllmExportError, match="needs the object 'text_config'"):
        diffusion_gemma.ModelArgs.from_dict({"model_type": "diffusion_gemma"})
    config = diffusion_gemma.tiny_config(384, {"eos": 1})
    config["text_config"]["hidden_activation"] = "silu"
    with pytest.raises(DllmExportError, match="hidden_activation 'silu'"):
        diffusion_gemma.ModelArgs.from_dict(config)
    del config["text_config"]["top_k_experts"]
    with pytest.raises(DllmExportError, match="text_config.top_k_experts"):
        diffusion_gemma.ModelArgs.from_dict(config)


def test_moe_strategies_agree_with_gelu_experts(loaded):
    """The exportable MoE forms run the experts with the tanh GELU too."""
    from dllm_export.models import set_moe_strategy

    prompt = _tokens(loaded, (1, PROMPT), 9)
    with torch.no_grad():
        eager = loaded(prompt)
        try:
            for strategy in ("dense", "sparse"):
                set_moe_strategy(loaded, strategy)
                assert (loaded(prompt) - eager).abs().max() < TOLERANCE, strategy
            with pytest.raises(DllmExportError, match="SwiGLU experts"):
                set_moe_strategy(loaded, "ort")
        finally:
            set_moe_strategy(loaded, "eager")
