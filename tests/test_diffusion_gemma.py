"""DiffusionGemma against transformers' ``DiffusionGemmaForBlockDiffusion`` on the same tiny
checkpoint in float32: the encoder (causal prefill writing the cache), the decoder (canvas
over the cached prefix, with and without a self-conditioning signal), the commit pass and
the next canvas after it; the checkpoint layout; parameter counts; ``plan`` for the
published 26B-A4B config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------- the sampler


class _TorchNoise:
    """transformers' ``torch.randint`` / ``torch.multinomial`` driven by the runtime's noise
    (the same seed and the same order of draws): multinomial becomes an inverse-CDF draw
    with one uniform per row."""

    def __init__(self, noise):
        self.noise = noise

    def randint(self, low=0, high=None, size=None, device=None, **_):
        return torch.as_tensor(self.noise.tokens(tuple(size))) + 0 * low

    def multinomial(self, probs, num_samples=1, **_):
        uniform = torch.as_tensor(self.noise.uniform((probs.shape[0],)))
        below = (torch.cumsum(probs, dim=-1) < uniform[:, None]).sum(dim=-1, keepdim=True)
        return torch.clamp(below, max=probs.shape[-1] - 1)


def _reference_generate(model, prompt, options, seed, monkeypatch, vocab, eos, pad):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    from dllm_export.runtime.diffusion_gemma import NumpyNoise

    fake = _TorchNoise(NumpyNoise(vocab, seed))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", fake.randint)
        patch.setattr(torch, "multinomial", fake.multinomial)
        with torch.no_grad():
            out = model.generate(
                torch.as_tensor(prompt), max_new_tokens=options["max_new_tokens"],
                max_denoising_steps=options["max_denoising_steps"], t_min=options["t_min"],
                t_max=options["t_max"],
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=options["entropy_bound"]),
                stability_threshold=options["stability_threshold"],
                confidence_threshold=options["confidence_threshold"],
                eos_token_id=list(eos), pad_token_id=pad)
    return out.sequences.numpy(), out.tokens_per_forward


SAMPLER_CASES = {
    # transformers' defaults (few steps): one position accepted a step, no early stop
    "defaults": dict(max_new_tokens=32, max_denoising_steps=6, t_min=0.4, t_max=0.8,
                     entropy_bound=0.1, stability_threshold=1, confidence_threshold=0.005),
    # a loose bound (a few positions a step) and a confidence threshold the falling
    # temperature crosses (the tiny model's mean entropy goes from 5.937 to 5.76), so that
    # rows stop early, one before the other, and a stopped row is frozen
    "early-stop": dict(max_new_tokens=48, max_denoising_steps=12, t_min=0.2, t_max=1.0,
                       entropy_bound=12.0, stability_threshold=0, confidence_threshold=5.93),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_matches_transformers_token_for_token(loaded, reference, monkeypatch, case):
    from dllm_export.runtime.diffusion_gemma import (
        GemmaSamplerConfig,
        NumpyNoise,
        TorchSteps,
        generate,
    )

    model, _ = reference
    options = SAMPLER_CASES[case]
    vocab = loaded.args.vocab_size
    prompt = _tokens(loaded, (2, 7), 10).numpy()
    config = GemmaSamplerConfig(**options)
    # a first run without an end token picks one the model produces in its second canvas
    # row 0, so that the end-of-sequence padding is exercised
    probe = generate(TorchSteps(loaded), prompt, config, NumpyNoise(vocab, 3))
    eos = [int(probe.sequences[0, 7 + loaded.args.canvas_length + 2])]
    pad = 0
    ours = generate(TorchSteps(loaded), prompt, config, NumpyNoise(vocab, 3), eos, pad)
    theirs, _ = _reference_generate(model, prompt, options, 3, monkeypatch, vocab, eos, pad)
    np.testing.assert_array_equal(ours.sequences, theirs)
    assert (ours.sequences[0, 7 + loaded.args.canvas_length + 3:] == pad).any()
    if case == "early-stop":
        assert max(ours.steps_per_canvas) < options["max_denoising_steps"]
        assert ours.forwards[0] != ours.forwards[1]  # the rows stopped at different steps
    else:
        assert ours.steps_per_canvas == [options["max_denoising_steps"]] * 2


def test_entropy_bound_acceptance_matches_the_rule():
    from dllm_export.runtime.diffusion_gemma import accept

    entropy = np.array([[0.3, 0.0, 0.05, 2.0, 0.04]], dtype=np.float32)
    # ascending 0.0, 0.04, 0.05, 0.3, 2.0: cumulative minus own 0, 0, 0.04, 0.09, 0.39
    np.testing.assert_array_equal(accept(entropy, 0.1), [[True, True, True, False, True]])
    np.testing.assert_array_equal(accept(entropy, 0.01), [[False, True, False, False, True]])


# ---------------------------------------------------------------- the exported graphs


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    from dllm_export.export.diffusion_gemma import export_graphs

    directory = tmp_path_factory.mktemp("dgemma-onnx") / "artifact"
    export_graphs(checkpoint, directory, batch=2, prompt_length=8, capacity=8 + 3 * CANVAS)
    return directory


@pytest.mark.slow
def test_graphs_are_trt_clean_and_decode_as_pytorch(exported, loaded):
    from dllm_export.export.trt_lint import check_trt
    from dllm_export.runtime.diffusion_gemma import OnnxSteps, TorchSteps

    for graph in ("prefill", "commit", "decoder"):
        assert not [f for f in check_trt(exported / f"{graph}.onnx")
                    if f.severity == "error"], graph
    prompt = _tokens(loaded, (2, 7), 11).numpy()
    canvas = _tokens(loaded, (2, CANVAS), 12).numpy()
    uniform = np.random.default_rng(0).random((2, CANVAS), dtype=np.float32)
    ours, onnx = TorchSteps(loaded), OnnxSteps(exported, threads=1)
    for steps in (ours, onnx):
        steps.reset(2)
        steps.encode(prompt, 0)
        steps.encode(canvas, 7)  # a commit pass: the next canvas reads 23 cached slots
    signal = (None, None)
    for _ in range(2):  # the first step (no signal) and one with the previous step's
        a = ours.denoise(canvas, 7 + CANVAS, 0.7, signal[0], uniform)
        b = onnx.denoise(canvas, 7 + CANVAS, 0.7, signal[1], uniform)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
        assert np.abs(a[2] - b[2]).max() < 1e-4
        soft = loaded.soft_embeddings(a[3]).numpy()
        assert np.abs(soft - b[3]).max() < 1e-4
        signal = (a[3], b[3])


@pytest.mark.slow
def test_onnx_runtime_generation_matches_pytorch_token_for_token(exported, loaded):
    """The same noise on ONNX Runtime and on the PyTorch steps (which match transformers'
    generate: test_sampler_matches_transformers_token_for_token)."""
    from dllm_export.runtime.diffusion_gemma import (
        GemmaSamplerConfig,
        NumpyNoise,
        OnnxSteps,
        TorchSteps,
        generate,
    )

    prompt = _tokens(loaded, (2, 7), 10).numpy()
    config = GemmaSamplerConfig(**SAMPLER_CASES["early-stop"])
    vocab = loaded.args.vocab_size
    theirs = generate(TorchSteps(loaded), prompt, config, NumpyNoise(vocab, 5), [7], 0)
    ours = generate(OnnxSteps(exported, threads=1), prompt, config, NumpyNoise(vocab, 5),
                    [7], 0)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    assert ours.steps_per_canvas == theirs.steps_per_canvas


@pytest.mark.slow
def test_onnx_steps_refuse_what_the_artifact_cannot_hold(exported):
    from dllm_export.runtime.diffusion_gemma import OnnxSteps

    steps = OnnxSteps(exported, threads=1)
    with pytest.raises(DllmExportError, match="exported for batch 2"):
        steps.reset(1)
    steps.reset(2)
    with pytest.raises(DllmExportError, match="takes up to 8"):
        steps.encode(np.zeros((2, 9), np.int64), 0)
    with pytest.raises(DllmExportError, match="larger --seq-len"):
        steps.encode(np.zeros((2, CANVAS), np.int64), 8 + 3 * CANVAS - 4)


def test_the_artifact_generates_text_behind_the_generator(exported):
    """``Generator.from_artifact`` on a DiffusionGemma artifact: its own sampler over the
    ONNX Runtime graphs, text in and out, the tokens of ``generate`` under the same seeded
    noise; what it cannot do is refused in one line."""
    from dllm_export.runtime import Generator
    from dllm_export.runtime.diffusion_gemma import (
        GemmaGenerator,
        GemmaSamplerConfig,
        NumpyNoise,
        OnnxSteps,
        generate,
    )

    gen = Generator.from_artifact(exported, threads=1)
    assert isinstance(gen, GemmaGenerator)
    prompts = ["ab cd", "ef gh"]
    ids = [gen.tokenizer.format_prompt(p, False) for p in prompts]
    assert len(ids[0]) == len(ids[1])
    out = gen.generate(prompts, gen_length=2 * CANVAS, steps=6, seed=3)
    steps = OnnxSteps(exported, threads=1)
    config = GemmaSamplerConfig(**{**gen.manifest["generation_defaults"],
                                   "max_new_tokens": 2 * CANVAS, "max_denoising_steps": 6})
    result = generate(steps, np.asarray(ids), config, NumpyNoise(steps.vocab_size, 3),
                      gen.eos_ids, gen.pad_id)
    for row, tokens in zip(result.sequences[:, len(ids[0]):].tolist(), out.tokens,
                           strict=True):
        end = next((i for i, t in enumerate(row) if t in gen.eos_ids), len(row))
        assert tokens == row[:end]
    assert out.texts == [gen.tokenizer.decode(t) for t in out.tokens]
    assert 0 < out.forwards <= 2 * 6
    with pytest.raises(DllmExportError, match="--threshold: not an option of DiffusionGemma"):
        gen.generate(prompts, threshold=0.9)
    with pytest.raises(DllmExportError, match="exactly 2 prompts of one length"):
        gen.generate(prompts[:1])
    with pytest.raises(DllmExportError, match=f"--gen-length {4 * CANVAS}: the cache of "
                                              f"{8 + 3 * CANVAS} slots holds"):
        gen.generate(prompts, gen_length=4 * CANVAS)


def test_plan_answers_for_the_artifact_as_for_its_checkpoint(exported, checkpoint):
    """``plan ARTIFACT`` reads DiffusionGemma's own manifest (batch, cache slots, MoE form,
    canvas) and answers what ``plan CHECKPOINT`` answers at those settings."""
    from dllm_export.device_profiles import load_profile
    from dllm_export.export.plan import plan_model

    profile = load_profile("jetson-agx-orin-64gb")
    ours = plan_model(exported, profile).as_dict()
    theirs = plan_model(checkpoint, profile, seq_len=8 + 3 * CANVAS, batch=2, cache=True,
                        block_length=CANVAS).as_dict()
    assert (ours["source_kind"], ours["batch"], ours["seq_len"]) == ("artifact", 2, 8 + 3 * CANVAS)
    assert ours["memory"] == theirs["memory"] and ours["fits"] is True
    with pytest.raises(DllmExportError, match="has fixed shapes"):
        plan_model(exported, profile, seq_len=128)


@pytest.mark.parametrize("stage, extra", [
    ("build", ["--profile", "jetson-agx-orin-64gb", "-o", "{out}"]),
    ("eval", []),
    ("profile", ["--profile", "cpu", "-o", "{out}"]),
    ("serve", ["--port", "8765"]),
    ("triton", ["-o", "{out}"]),
])
def test_stages_that_do_not_take_its_artifact_yet_say_so(exported, tmp_path, stage, extra):
    """Every verb that does not take a DiffusionGemma artifact yet refuses it in one line,
    before writing anything (they raised KeyError, TypeError and AttributeError)."""
    from click.testing import CliRunner

    from dllm_export.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [stage, str(exported),
                                       *[a.format(out=out) for a in extra]])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"error: {exported}: a DiffusionGemma artifact (its own graphs and "
                         f"sampler): dllm-export run and plan take it, {stage} does not yet "
                         "(docs/diffusion-gemma.md)")
    assert "Traceback" not in result.output and not out.exists()


def test_export_validates_shares_one_weights_file_and_validate_reruns_it(exported, tmp_path):
    """The export checks its graphs against PyTorch and records it (valid), names nodes by
    module path, writes one weights file for the three graphs; ``dllm-export validate``
    verifies the files and reruns the check; an existing output is not replaced."""
    import onnx
    from click.testing import CliRunner

    from dllm_export.cli import main
    from dllm_export.jsonio import read_json

    manifest = read_json(exported / "manifest.json")
    assert manifest["valid"] is True and manifest["precision"] == "fp32"
    graphs = manifest["validation"]["graphs"]
    assert set(graphs) == {"prefill", "commit", "decoder"}
    assert all(case["max_abs_diff"] < 1e-4 and not case["failed"] for case in graphs.values())
    assert graphs["decoder"]["argmax_agreement"] == 1.0
    assert [f.name for f in exported.glob("*.data")] == ["prefill.onnx.data"]
    locations = set()
    for graph in ("prefill", "commit", "decoder"):
        model = onnx.load(str(exported / f"{graph}.onnx"), load_external_data=False)
        locations |= {e.value for t in model.graph.initializer for e in t.external_data
                      if e.key == "location"}
        names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
        assert "model.decoder.layers.0.moe.gate.proj/Gemm" in names
    assert locations == {"prefill.onnx.data"}
    result = CliRunner().invoke(main, ["validate", str(exported)])
    assert result.exit_code == 0, result.output
    assert "validated against PyTorch: prefill max abs diff" in result.output
    again = CliRunner().invoke(main, ["export", str(manifest["source"]["checkpoint"]), "-o",
                                      str(exported), "--seq-len", "40"])
    assert again.exit_code != 0 and "already exists; choose another path or pass " \
        "--overwrite" in again.output


# ---------------------------------------------------------------- quantisation


def test_gate_phases_split_each_canvas_in_thirds():
    from dllm_export.calibration.diffusion_gemma import _phases

    steps = [0, 1, 2, 0, 1, 2, 3, 4, 5, 0]
    assert _phases([{"step": s} for s in steps]) == [0, 1, 2, 0, 0, 1, 1, 2, 2, 0]


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """The shipped task-trained DiffusionGemma, exported for batch 1 with room for the
    held-out prompts and two canvases."""
    from dllm_export.export.diffusion_gemma import export_graphs
    from dllm_export.shipped import DIFFUSION_GEMMA_TASKS

    directory = tmp_path_factory.mktemp("dgemma-trained") / "artifact"
    export_graphs(DIFFUSION_GEMMA_TASKS, directory, batch=1, prompt_length=40,
                  capacity=40 + 2 * CANVAS)
    return directory


QUANTIZED = {  # name: QuantizeOptions fields
    "int8": {"precision": "int8"},  # Q/DQ, calibrated on the sampler's states
    "int4": {"precision": "int4"},  # MatMulNBits (ONNX Runtime)
    "int4-orin": {"precision": "int4", "profile": "jetson-agx-orin-64gb"},  # DequantizeLinear
}


@pytest.fixture(scope="module")
def quantized(trained_export, tmp_path_factory):
    """The trained model quantised each way of ``QUANTIZED``, each behind the gate."""
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact

    root, made = tmp_path_factory.mktemp("dgemma-quantized"), {}

    def get(name):
        if name not in made:
            made[name] = (root / name, quantize_artifact(trained_export, root / name,
                                                         QuantizeOptions(**QUANTIZED[name])))
        return made[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantisation_passes_its_gate_on_the_trained_model(quantized, trained_export, name):
    """Every graph quantised (Q/DQ that ONNX Runtime fuses into integer kernels,
    MatMulNBits blocks, or for a TensorRT profile INT4 DequantizeLinear blocks that
    check-trt passes) but the routers and the tied embedding; the gate compared the
    denoising steps in lockstep and the generations and judged task accuracy; the
    artifact then decodes behind the Generator."""
    import onnx

    from dllm_export.calibration.gate import DEFAULT_BARS
    from dllm_export.export.trt_lint import check_trt
    from dllm_export.runtime import Generator

    directory, manifest = quantized(name)
    precision = QUANTIZED[name]["precision"]
    assert manifest["valid"] is True and manifest["precision"] == precision
    gate = manifest["quality_gate"]
    assert gate["passed"] and [c["name"] for c in gate["checks"]] == [
        "denoising argmax agreement (worst third of the steps)", "generation token agreement",
        "task accuracy drop"]
    bars = DEFAULT_BARS[precision]
    values = {c["name"]: c for c in gate["checks"]}
    assert values["generation token agreement"]["value"] >= bars.min_generation_agreement
    task = values["task accuracy drop"]
    assert task["judged"] is True and task["float"] >= 0.1  # learnt something (random: 0)
    assert set(gate["report"]["by_phase"]) == {"early", "middle", "late"}
    quant = manifest["quantization"]
    for graph in ("prefill", "commit", "decoder"):
        selected, kernels = quant["graphs"][graph], quant["kernels"][graph]
        assert all(reason in ("router", "decode head") for reason in selected["excluded"].values())
        assert sum(r == "router" for r in selected["excluded"].values()) >= 3
        if name == "int4-orin":  # standard MatMuls after INT4 DequantizeLinear blocks,
            # which ONNX Runtime's optimiser fuses back into MatMulNBits
            model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
            blocks = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert len(blocks) == selected["quantized"]
            assert not {n.op_type for n in model.graph.node} & {"MatMulNBits", "QLinearMatMul"}
            assert not [f for f in check_trt(directory / f"{graph}.onnx")
                        if f.severity == "error"], graph
        fast = kernels["integer"] if precision == "int8" else kernels["weight_only"]
        assert fast == selected["quantized"], (graph, kernels)
    assert any("embed_tokens" in name or name == "node_matmul"
               for name in quant["graphs"]["decoder"]["excluded"])
    assert quant["method"] == {"int8": "minmax", "int4": "nbits", "int4-orin": "ort-dq"}[name]
    assert ("jetson-agx-orin-64gb" in quant["runs_on"]) == (name != "int4")
    if precision == "int8":
        assert quant["calibration"]["source"] == "tasks"
        assert quant["calibration"]["kept"]["decoder"] == 32
    size = sum(f.stat().st_size for f in directory.glob("*.data"))
    float_size = sum(f.stat().st_size for f in trained_export.glob("*.data"))
    assert size < (0.4 if precision == "int8" else 0.3) * float_size
    out = Generator.from_artifact(directory, threads=1).generate("Add 12 and 30.", chat=True)
    assert out.forwards >= 1


@pytest.mark.slow
def test_calibration_records_the_sampler_s_own_denoising_states(trained_export):
    """What calibration feeds the decoder is what the sampler runs: canvases of random
    tokens at a canvas's first step, its temperatures, a zero signal first and soft
    embeddings after; the encoder graphs get the prompt and the committed canvases."""
    from dllm_export.calibration.diffusion_gemma import RecordingSteps, _generate
    from dllm_export.jsonio import read_json
    from dllm_export.runtime.diffusion_gemma import GemmaGenerator
    from dllm_export.runtime.tokenizer import TextTokenizer

    manifest = read_json(trained_export / "manifest.json")
    steps = RecordingSteps(trained_export, threads=1, manifest=manifest, keep=10_000)
    generator = GemmaGenerator(steps, TextTokenizer(trained_export), manifest)
    ids = generator.tokenizer.format_prompt("Reverse the words: sun moon star", True)
    _generate(generator, ids, seed=0)
    decoder = steps.kept["decoder"]
    assert len(decoder) == steps.seen["decoder"] >= 2
    temperatures = [float(f["temperature"][0]) for f in decoder]
    defaults = manifest["generation_defaults"]
    low, high = np.float32(defaults["t_min"]), np.float32(defaults["t_max"])  # as fed
    assert all(low <= t <= high for t in temperatures)
    assert temperatures[0] == max(temperatures) and len(set(temperatures)) > 1
    zero = [not f["signal"].any() for f in decoder]
    assert zero[0] and not all(zero)
    assert steps.kept["prefill"][0]["input_ids"][0, :len(ids)].tolist() == ids
    few = RecordingSteps(trained_export, threads=1, manifest=manifest, keep=3)
    _generate(GemmaGenerator(few, generator.tokenizer, manifest), ids, seed=0)
    assert len(few.kept["decoder"]) == 3 and few.seen["decoder"] == len(decoder)


@pytest.mark.slow
def test_the_gate_refuses_a_model_below_its_bar(exported, tmp_path):
    """The random tiny model predicts every token with about the same probability (mean
    entropy near log V): its argmax moves with any rounding, and the gate refuses its INT8
    candidate in one line, writing the artifact marked invalid."""
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from dllm_export.jsonio import read_json

    out = tmp_path / "int8"
    with pytest.raises(DllmExportError, match=r"quality gate failed \(denoising argmax "
                                              r"agreement \(worst third of the steps\)"):
        quantize_artifact(exported, out, QuantizeOptions(precision="int8", samples=8,
                                                         gate_samples=4))
    manifest = read_json(out / "manifest.json")
    assert manifest["valid"] is False
    assert manifest["quality_gate"]["report"]["mean_entropy_float"] > 0.95 * np.log(
        manifest["vocab_size"])


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp8"}, "--method modelopt-max: a DiffusionGemma artifact quantises with "
                           "ONNX Runtime's Q/DQ"),
    ({"precision": "int4", "method": "qmoe"}, "--method qmoe: a DiffusionGemma artifact"),
    ({"precision": "int8", "exclude": ("*",)}, "--exclude left no linear layer of the "
                                               "prefill graph"),
    ({"precision": "int4", "method": "nbits", "profile": "jetson-agx-thor"},
     "--method nbits writes a nbits graph, which tensorrt cannot run"),
])
def test_quantize_refuses_what_it_cannot_do_in_one_line(exported, tmp_path, options, message):
    from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact

    out = tmp_path / "out"
    with pytest.raises(DllmExportError, match=message.replace("(", r"\(")):
        quantize_artifact(exported, out, QuantizeOptions(gate=False, samples=1, **options))
    assert not out.exists()
