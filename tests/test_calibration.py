"""Calibration sources, denoiser states, coverage, node selection and graph rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_export import DllmExportError
from dllm_export.calibration import coverage, recipes, sources, states
from dllm_export.calibration.evalgraph import fake_quant_fp8
from dllm_export.calibration.ort_backend import gemm_to_matmul
from dllm_export.export.onnx import ExportOptions, export_model
from dllm_export.runtime import Generator

SEQ_LEN = 48


@pytest.fixture(scope="module")
def moe_artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "moe-dense"
    export_model(
        tiny_dir("llada-moe"), out, ExportOptions(seq_len=SEQ_LEN, moe="dense")
    )
    return out


def test_text_and_jsonl_sources(tmp_path):
    text = tmp_path / "data.txt"
    text.write_text(
        "one two three four five six seven eight\n\nalpha beta gamma delta\n"
    )
    items = list(sources.text_file(text))
    assert [i.prompt for i in items] == ["one two", "alpha"]
    assert items[0].response == " three four five six seven eight" and not items[0].chat
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                    ]
                },
                {"prompt": "What is 2 + 2?"},
                {"prompt": "Sort: 3 1", "response": "1 3"},
                {"text": "a b c d e f g h"},
            )
        )
        + "\n"
    )
    items = list(sources.jsonl_file(jsonl))
    assert (
        items[0].prompt == [{"role": "user", "content": "hi"}]
        and items[0].response == "hello"
    )
    assert items[1].response is None and items[2].response == "1 3"
    assert items[3].prompt == "a b" and not items[3].chat
    (tmp_path / "bad.jsonl").write_text('{"nothing": 1}\n')
    with pytest.raises(DllmExportError, match="line 1 has none of the keys"):
        list(sources.jsonl_file(tmp_path / "bad.jsonl"))


def test_builtin_sources_and_names():
    from itertools import islice

    pytest.importorskip("dllm_export.eval.tasks", reason="the task generators (eval/)")

    from dllm_export.eval.tasks import Example, is_held_out

    additions = [item for item in islice(sources.default_tasks(), 200) if " + " in item.prompt]
    assert additions
    for item in additions:  # training-side problems only: never one the gate evaluates on
        example = Example("add", item.prompt, item.response.strip())
        assert not is_held_out(example)
        assert item.response == f" {example.answer}"  # as the model writes it
    assert len(list(sources.generic_text())) >= 30
    with pytest.raises(DllmExportError, match="neither a file nor a source name"):
        sources.open_source("wikitext", "generic")


def test_empty_calibration_data_is_one_clear_line(moe_artifact, tmp_path):
    generator = Generator.from_artifact(moe_artifact)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _, texts = sources.open_source(empty, "generic")
    with pytest.raises(DllmExportError, match="calibration data is empty"):
        states.calibration_states(
            generator.backend,
            texts,
            generator.tokenizer,
            generator.defaults,
            generator.special,
            8,
        )


def test_states_cover_mask_ratios_and_experts(moe_artifact):
    generator = Generator.from_artifact(moe_artifact)
    manifest = json.loads((moe_artifact / "manifest.json").read_text())
    made = states.calibration_states(
        generator.backend,
        sources.generic_text(),
        generator.tokenizer,
        generator.defaults,
        generator.special,
        samples=20,
    )
    assert len(made) == 20
    assert {s.origin for s in made} == {"forward", "trajectory"}
    assert all(s.input_ids.shape == (SEQ_LEN,) for s in made)
    forward = sorted(s.mask_ratio for s in made if s.origin == "forward")
    assert forward[0] < 0.25 and forward[-1] > 0.75  # stratified across (0, 1)
    trajectory = [s.mask_ratio for s in made if s.origin == "trajectory"]
    assert (
        trajectory[0] == 1.0 and min(trajectory) < 0.5
    )  # starts fully masked, then fills
    histogram = coverage.mask_ratio_histogram(made)
    assert sum(histogram["forward"]) + sum(histogram["trajectory"]) == 20
    experts = coverage.expert_coverage(
        moe_artifact / "model.onnx", manifest, made, manifest["moe"]["experts"]
    )
    tokens = 20 * SEQ_LEN - sum(int((s.attention_mask == 0).sum()) for s in made)
    for layer in experts["layers"].values():
        assert sum(layer["routed"]) == tokens * manifest["moe"]["top_k"]
        assert layer["calibrated"] == [tokens] * manifest["moe"]["experts"]
    assert experts["uncalibrated"] == []
    assert all(name.startswith("model.layers.") for name in experts["unrouted"])


def test_calibration_reports_generation_forwards_with_an_estimate(moe_artifact):
    """Generic prompts carry no answers: mixed calibration runs the float model's own
    generations (16 states: one trajectory, one more answer for the forward-process
    states), reported forward by forward against the plan, with the time left."""
    generator = Generator.from_artifact(moe_artifact)
    config = generator.defaults.updated(early_exit=False)  # every planned step runs
    backend = generator.backend
    forwards = []
    original = backend.predict
    backend.predict = lambda *args, **kwargs: forwards.append(1) or original(*args, **kwargs)
    reported = []
    made = states.calibration_states(
        backend, sources.generic_text(), generator.tokenizer, config, generator.special,
        samples=16, progress=lambda stage, detail="": reported.append((stage, detail)))
    assert len(made) == 16 and {s.origin for s in made} == {"forward", "trajectory"}
    planned = 2 * config.steps
    assert len(forwards) == planned and len(reported) == planned
    first, last = reported[0][1], reported[-1][1]
    assert first.startswith(f"trajectory 1/1: forward 1/{planned}, about ")
    assert reported[-1][0] == "calibration"
    assert last.startswith(f"answer 1/1: forward {planned}/{planned}, about ")
    assert all(detail.endswith(" left") for _, detail in reported)


def _linear_graph():
    """x -> Gemm(transB, bias) named like a router -> MatMul named like a head."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 4)).astype(np.float32)
    b1 = rng.normal(size=(6,)).astype(np.float32)
    w2 = rng.normal(size=(6, 5)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Gemm",
            ["x", "w1", "b1"],
            ["h"],
            transB=1,
            name="model.layers.0.mlp.gate/Gemm",
        ),
        helper.make_node(
            "MatMul", ["h", "w2"], ["y"], name="model.layers.0.proj/MatMul"
        ),
        helper.make_node("MatMul", ["y", "w3"], ["z"], name="lm_head/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w2[:5, :].T.copy(), "w3"))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gemm_becomes_matmul_with_the_same_result():
    model = _linear_graph()
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == [
        "MatMul",
        "Add",
        "MatMul",
        "MatMul",
    ]
    assert model.graph.node[0].name == "model.layers.0.mlp.gate/MatMul"
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_recipe_keeps_router_and_head_unless_asked():
    model = _linear_graph()
    gemm_to_matmul(model)
    chosen = recipes.select_nodes(model, recipes.Recipe())
    assert chosen.quantize == ["model.layers.0.proj/MatMul"]
    assert chosen.excluded == {
        "model.layers.0.mlp.gate/MatMul": "router",
        "lm_head/MatMul": "decode head",
    }
    chosen = recipes.select_nodes(model, recipes.Recipe(quantize_router=True))
    assert "model.layers.0.mlp.gate/MatMul" in chosen.quantize
    chosen = recipes.select_nodes(model, recipes.Recipe(exclude=("*.proj/*",)))
    assert (
        chosen.quantize == []
        and chosen.excluded["model.layers.0.proj/MatMul"] == "--exclude"
    )
    assert (
        recipes.select_nodes(model, recipes.Recipe(exclude=("MatMul",))).quantize == []
    )


def test_fp8_fake_quant_rounds_like_e4m3():
    """Q/DQ to float8 e4m3 (what ModelOpt writes) becomes e4m3 rounding in float32,
    equal to ml_dtypes' rounding of x / scale, times scale."""
    import ml_dtypes

    scale = np.float32(0.05)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
    ]
    inits = [
        numpy_helper.from_array(np.array(scale), "s"),
        helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    fake = fake_quant_fp8(model, weights_dir=".")
    assert {n.op_type for n in fake.graph.node} == {"Div", "Cast", "Mul"}
    x = np.random.default_rng(2).normal(scale=3, size=64).astype(np.float32)
    got = ort.InferenceSession(fake.SerializeToString()).run(None, {"x": x})[0]
    expected = (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.allclose(got, x)  # really rounded
    onnx.checker.check_model(fake)


@pytest.mark.parametrize("bits", [8, 4])
def test_qmoe_rows_round_trip(bits):
    """Codes are unsigned with an offset, 4-bit pairs low nibble first (the ORT CPU layout);
    dequantised weights are within half a step of the originals."""
    from dllm_export.calibration.qmoe import quantize_rows

    weights = np.random.default_rng(3).normal(size=(2, 3, 8)).astype(np.float32)
    codes, scales = quantize_rows(weights, bits)
    if bits == 4:
        codes = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(2, 3, 8)
    restored = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    assert np.abs(restored - weights).max() <= scales.max() / 2 + 1e-6


def _moe_reference(x, logits, fc1, fc2, k, normalize):
    """A SwiGLU MoE in numpy: softmax over every expert, the top k mixed (renormalised to
    sum to 1 if ``normalize``); fc1 [E, 2I, D] gate/up interleaved, fc2 [E, D, I]."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:k]
        weights = probs[t, top] / (probs[t, top].sum() if normalize else 1.0)
        for weight, e in zip(weights, top, strict=True):
            hidden = fc1[e] @ x[t]
            gate, up = hidden[0::2], hidden[1::2]
            out[t] += weight * (fc2[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("bits", [8, 4])
def test_qmoe_computes_the_moe_of_its_dequantised_weights(bits, normalize):
    """The converted QMoE node, run by ONNX Runtime's CPU kernel, equals the mixture of
    experts computed in numpy with the dequantised weights, with and without
    renormalised routing (the kernel renormalises always; the conversion scales back)."""
    from dllm_export.calibration.qmoe import moe_to_qmoe, quantize_rows

    rng = np.random.default_rng(5)
    experts, hidden, inner, tokens, k = 4, 64, 32, 8, 2
    fc1 = rng.normal(scale=0.1, size=(experts, 2 * inner, hidden)).astype(np.float32)
    fc2 = rng.normal(scale=0.1, size=(experts, hidden, inner)).astype(np.float32)
    x = rng.normal(size=(tokens, hidden)).astype(np.float32)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], name="l0/MoE",
                            domain="com.microsoft", k=k, activation_type="swiglu",
                            swiglu_fusion=1, normalize_routing_weights=normalize,
                            activation_alpha=1.0, activation_beta=0.0)
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [tokens, experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert moe_to_qmoe(model, bits, Path(".")) == 1
    assert {n.op_type for n in model.graph.node} & {"MoE", "QMoE"} == {"QMoE"}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(None, {"x": x, "logits": logits})[0]

    def dequantised(weights):
        codes, scales = quantize_rows(weights, bits)
        if bits == 4:
            codes = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(weights.shape)
        return (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]

    expected = _moe_reference(x, logits, dequantised(fc1), dequantised(fc2), k, normalize)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # the other routing rule differs far beyond that tolerance: the check can fail
    other = _moe_reference(x, logits, dequantised(fc1), dequantised(fc2), k, not normalize)
    assert np.abs(other - got).max() > 1e-2


def test_onnx_runtime_calibration_passes_are_counted_with_an_estimate():
    """One tick per batch once ONNX Runtime asks for the next (the previous has run),
    across the strided ranges the calibrator reads."""
    from dllm_export.calibration.ort_backend import FeedsReader

    reported = []
    reader = FeedsReader([{"x": i} for i in range(4)],
                         lambda stage, detail="": reported.append((stage, detail)))
    seen = []
    for start in (0, 2):
        reader.set_range(start, start + 2)
        while (feeds := reader.get_next()) is not None:
            seen.append(feeds["x"])
    assert seen == [0, 1, 2, 3]
    assert [d.split(": ")[1].split(",")[0] for _, d in reported] == [
        f"forward {i}/4" for i in range(1, 5)]
    assert all(stage == "calibrate" and d.endswith(" left") for stage, d in reported)


def test_default_sample_count_costs_four_generations(moe_artifact):
    """quantize's default --samples on prompts without answers: four of the float model's
    generations (the old default of 64 ran eight; on a 163M LLaDA here each costs about
    4 minutes, docs/quantization.md)."""
    from dllm_export.calibration.quantize import QuantizeOptions

    generator = Generator.from_artifact(moe_artifact)
    config = generator.defaults.updated(early_exit=False)
    backend = generator.backend
    forwards = []
    original = backend.predict
    backend.predict = lambda *args, **kwargs: forwards.append(1) or original(*args, **kwargs)
    samples = QuantizeOptions().samples
    made = states.calibration_states(backend, sources.generic_text(), generator.tokenizer,
                                     config, generator.special, samples=samples)
    assert len(made) == samples
    assert len(forwards) == 4 * config.steps
