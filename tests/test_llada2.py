"""LLaDA2.0 / 2.1: the family against independent formulations, its sampler against a port
of the reference ``generate`` (2.0) and its token editing (2.1), the exact block cache, the
MoE forms, the export and ``plan`` on the published configs.

References: transformers' ``DeepseekV3TopkRouter`` and ``DeepseekV3MoE`` (the same routing
rule and expert mixing) inside a literal forward written from the published modeling
code's facts (tests/references.py); float32, the same weights, max |logit difference|
below 2e-5 (only operation order differs). The samplers: tokens exactly at temperature 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference_samplers as ref
import torch
from references import (
    PositionBiased,
    block_causal_bias,
    deepseek_v3_moe,
    llada2_reference_logits,
)

from dllm_export import families
from dllm_export.models.moe import sigmoid_group_topk
from dllm_export.runtime.backends.torch_backend import TorchBackend
from dllm_export.runtime.generate import SamplerConfig, Special, denoise

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PARITY_ATOL = 2e-5


@pytest.fixture(scope="module")
def llada2(tiny_model):
    return tiny_model("llada2")


def test_router_matches_deepseek_v3(llada2):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3TopkRouter,
    )

    model, _ = llada2
    gate = model.moe_blocks()[0].gate
    a = model.args
    config = DeepseekV3Config(hidden_size=a.hidden_size, n_routed_experts=a.num_experts,
                              num_experts_per_tok=a.num_experts_per_tok, n_group=a.n_group,
                              topk_group=a.topk_group, norm_topk_prob=True,
                              routed_scaling_factor=a.routed_scaling_factor)
    theirs = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        theirs.weight.copy_(gate.weight)
        theirs.e_score_correction_bias.copy_(gate.expert_bias)
    hidden = torch.randn(64, a.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = gate.route(hidden)
        _, their_weights, their_ids = theirs(hidden)
    order, their_order = ids.argsort(-1), their_ids.argsort(-1)
    assert torch.equal(ids.gather(-1, order), their_ids.gather(-1, their_order))
    torch.testing.assert_close(weights.gather(-1, order), their_weights.gather(-1, their_order))
    assert gate.expert_bias.abs().max() > 0  # the selection bias is exercised


def test_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[0.0, 0.1, 2.0, -1.0]])
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])
    weights, ids = sigmoid_group_topk(logits, 1, 1, 1, scaling=1.0, bias=bias)
    # the bias picked expert 0; its weight is its own unbiased score (no renorm at k = 1)
    assert ids.tolist() == [[0]] and weights.item() == pytest.approx(0.5)
    weights, ids = sigmoid_group_topk(logits, 2, 2, 1, scaling=2.5)
    assert sorted(ids[0].tolist()) == [2, 3]  # group {2, 3} scores 0.88 + 0.27 > {0, 1}
    assert weights.sum().item() == pytest.approx(2.5)


@pytest.mark.parametrize("strategy", ["eager", "dense", "sparse", "ort"])
def test_moe_forms_match_deepseek_v3_moe(strategy, tiny_dir):
    from dllm_export.models import load_model, set_moe_strategy

    model, _ = load_model(tiny_dir("llada2"))
    block = model.moe_blocks()[0]
    reference = deepseek_v3_moe(block, model.args)
    if strategy != "eager":
        set_moe_strategy(model, strategy, 4)
    hidden = torch.randn(2, 9, model.args.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (block(hidden) - reference(hidden)).abs().max() < 1e-5


@pytest.mark.parametrize("rule", ["bidirectional", "block_causal"])
def test_family_matches_the_reference_forward(rule, llada2):
    from dllm_export.runtime.attention import block_ids, canvas_mask

    model, _ = llada2
    ids = torch.randint(0, 370, (1, 20), generator=torch.Generator().manual_seed(2))
    real = np.ones((1, 20), dtype=bool)
    bias = block_causal_bias(20, 8) if rule == "block_causal" else None
    visible = torch.from_numpy(canvas_mask(rule, real, block_ids(20, 0, 8, origin=0)))
    with torch.no_grad():
        ours = model(ids, positions=torch.arange(20)[None], visible=visible)
        theirs = llada2_reference_logits(model, ids, bias)
    assert (ours - theirs).abs().max().item() < PARITY_ATOL


def _setup(tiny_dir, llada2, scale=4.0):
    from dllm_export.checkpoint import resolve_special_tokens
    from dllm_export.runtime.tokenizer import TextTokenizer

    model, checkpoint = llada2
    tokens = resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                                    TextTokenizer(tiny_dir("llada2")), tiny_dir("llada2"))
    special = Special(tokens.mask_id, tokens.eos_id, tokens.eot_id, tokens.eos_id)
    return PositionBiased(model, tokens.mask_id, seed=5, rows=128, scale=scale), special


PROMPT = [5, 17, 42, 99, 120, 7]  # 6 tokens: the first block holds the prompt and 2 masks
CASES = {
    "2.0-threshold": dict(threshold=0.6, steps=8),
    "2.0-schedule": dict(threshold=0.999, steps=4),
    "2.0-eos-early-stop": dict(threshold=0.6, steps=8, eos_early_stop=True),
    # a weaker bias, so that committed tokens' predictions move as the block fills in
    "2.1-editing": dict(threshold=0.2, steps=8, editing_threshold=0.05, max_post_steps=3),
}
SCALES = {"2.1-editing": 2.0}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_matches_the_reference_generate(case, tiny_dir, llada2):
    biased, special = _setup(tiny_dir, llada2, SCALES.get(case, 4.0))
    options = dict(CASES[case], gen_length=26, block_length=8)  # 6 + 26 = 4 whole blocks

    def logits_fn(x, end):
        visible = block_causal_bias(end, 8)[0] == 0
        return biased(x, positions=torch.arange(end)[None], visible=visible)

    history = []
    want = ref.llada2_generate(logits_fn, torch.tensor([PROMPT]), mask_id=special.mask_id,
                               eos_id=special.eos_id, history=history, **options)
    backend = TorchBackend(biased, (special.eos_id, special.eot_id))
    for cache in ("none", "block"):
        steps = []
        config = SamplerConfig(algorithm="llada2", cache=cache, early_exit=False, **options)
        result = denoise(backend, [PROMPT], config, special, family=families.family("llada2"),
                         on_step=lambda info, steps=steps: steps.append(info.canvas.copy()))
        np.testing.assert_array_equal(np.array(steps), torch.stack(history).numpy())
        assert result.sequences.tolist() == want.tolist()
    if case == "2.1-editing":  # edits really happened: a committed token changed later
        changed = [(h0 != h1) & (h0 != special.mask_id) for h0, h1 in zip(history[:-1], history[1:], strict=True)]
        assert any(bool(c.any()) for c in changed)


def test_block_cache_forwards(tiny_dir, llada2):
    """The exact block cache: a prompt prefill (the prompt's complete blocks), block
    steps, and one commit per finished block but the last."""
    biased, special = _setup(tiny_dir, llada2)
    backend = TorchBackend(biased, (special.eos_id,))
    prompt = list(range(10, 20))  # 10 tokens: block 0 complete, block 1 starts at 8
    calls = []
    original = backend._call
    backend._call = lambda *a: calls.append(a[0].shape[1]) or original(*a)
    config = SamplerConfig(algorithm="llada2", gen_length=22, block_length=8, steps=8,
                           threshold=0.6, early_exit=False)
    result = denoise(backend, [prompt], config, special, family=families.family("llada2"))
    assert calls[0] == 32 and all(c == 8 for c in calls[1:])
    assert result.forwards == len(calls)
    assert result.cache == "block" and result.attention == "block_causal"  # the defaults


@pytest.mark.skipif(not (REFERENCE / "llada2-mini").is_dir(), reason="no shared reference")
@pytest.mark.parametrize("name", ["llada2-mini", "llada2-flash"])
def test_plan_answers_for_the_published_configs(name):
    from dllm_export.device_profiles import all_profiles
    from dllm_export.export.plan import plan_model

    for profile in all_profiles():
        for precision in profile.precisions:
            plan = plan_model(REFERENCE / name, profile, precision=precision, seq_len=512,
                              cache=True)
            assert plan.as_dict()["parameters"] > 1.6e10
            assert plan.fits or plan.suggestions, (name, profile.name, precision)
    nx = next(p for p in all_profiles() if p.name == "jetson-orin-nx-16gb")
    if name == "llada2-mini":
        assert plan_model(REFERENCE / name, nx, precision="int4", seq_len=512, cache=True).fits
        assert not plan_model(REFERENCE / name, nx, precision="int8", seq_len=512).fits


def test_export_validates_and_runs_the_block_cache_on_onnx_runtime(artifact, tiny_dir):
    from dllm_export.runtime import Generator

    directory = artifact("llada2", "dense")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["valid"] and manifest["family"] == "llada2"
    assert manifest["cache"]["default"] == "block"
    # --target onnxruntime: only the fused attention and RoPE are ONNX Runtime's own
    assert {f["op"] for f in manifest["trt_compatibility"]["findings"]} == {
        "com.microsoft::MultiHeadAttention", "com.microsoft::RotaryEmbedding"}
    onnx, torch_gen = Generator.from_artifact(directory), Generator.from_checkpoint(tiny_dir("llada2"))
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 300, 32)]
    config = SamplerConfig(algorithm="llada2", gen_length=16, block_length=8, steps=8,
                           threshold=0.95, early_exit=False)
    for cache in ("block", "none"):
        run = config.updated(cache=cache)
        got = denoise(onnx.backend, [prompt], run, onnx.special, family=families.family("llada2"))
        want = denoise(torch_gen.backend, [prompt], run, torch_gen.special,
                       family=families.family("llada2"))
        assert got.sequences.tolist() == want.sequences.tolist(), cache


def test_many_experts_for_tensorrt_get_a_form_per_graph(tmp_path):
    """--moe auto --target tensorrt with more than 16 experts: the sparse form where a graph
    has more than DENSE_ROWS rows (canvas, prefill), dense in the step, window and decode
    graphs; every graph parser-clean and the whole export validated against PyTorch."""
    import onnx

    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.models.tiny import make_tiny

    checkpoint = make_tiny("llada2", tmp_path / "ckpt",
                           overrides={"num_experts": 32, "n_group": 4, "topk_group": 2})
    manifest = export_model(checkpoint, tmp_path / "art", ExportOptions(
        seq_len=48, block_length=8, window=16, target="tensorrt"))
    assert manifest["valid"] and manifest["trt_compatibility"]["clean"]
    forms = {name: graph["form"] for name, graph in manifest["moe"]["graphs"].items()}
    assert forms == {"canvas": "sparse", "prefill": "sparse", "step": "dense",
                     "window": "dense", "decode": "dense"}
    assert manifest["moe"]["strategy"] == "sparse" and manifest["moe"]["block"] == 4  # 48 x 4 / 32 = 6 routed rows per expert
    for name, form in forms.items():  # the sparse form scatters rows into expert blocks
        file = manifest["graph"]["file"] if name == "canvas" else f"{name}.onnx"
        graph = onnx.load(str(tmp_path / "art" / file), load_external_data=False).graph
        assert ("ScatterND" in {n.op_type for n in graph.node}) == (form == "sparse"), name


@pytest.mark.skipif(not (REFERENCE / "llada2-mini").is_dir(), reason="no shared reference")
def test_inspect_answers_from_the_published_config():
    from click.testing import CliRunner

    from dllm_export.cli import main

    result = CliRunner().invoke(main, ["inspect", str(REFERENCE / "llada2-mini"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    # 16,255,643,392 tensors in the published checkpoint, less 19 x 256 expert biases
    assert info["parameters"] == 16_255_638_528
    assert 1.42e9 < info["active_parameters_per_token"] < 1.44e9
    assert info["experts"] == {"total": 256, "per_token": 8}
