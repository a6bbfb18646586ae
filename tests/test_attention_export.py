"""Fused attention in the exported graphs (export/onnx_attention.py, passes.skip_unpadded_mask):
each form validated against PyTorch for every family, canvas and cached graphs alike.

Tolerance: float32 graphs, so every log-probability difference stays at rounding level
(< 1e-4; the fused kernels sum in another order than PyTorch's SDPA)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import ARTIFACT_BLOCK

from dllm_export import DllmExportError
from dllm_export.export.onnx import ExportOptions, export_model
from dllm_export.export.onnx_attention import resolve_attention
from dllm_export.export.trt_lint import check_trt

SEQ_LEN = 48
GRAPHS = ("model.onnx", "prefill.onnx", "step.onnx", "window.onnx", "decode.onnx")
LAYERS = {"llada": 2, "llada-moe": 2, "dream": 2, "llada2": 3}


def op_counts(path, recursive=True) -> Counter:
    model = onnx.load(str(path), load_external_data=False)

    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if recursive and attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)

    # the MoE router's Softmax (its module path has ".mlp") is not attention
    return Counter("RouterSoftmax" if node.op_type == "Softmax" and ".mlp" in node.name
                   else node.op_type for node in walk(model.graph))


def assert_validated(manifest):
    assert manifest["valid"] is True
    for row in manifest["validation"]["results"]:
        assert row["failed"] == [] and row["top1_agreement_ties"] >= 0.999, row
        assert row["logprob_diff"] < 1e-4, row


def test_attention_form_per_target_and_refusals():
    assert resolve_attention("auto", "onnxruntime", 18) == "mha"
    assert resolve_attention("auto", "tensorrt", 18) == "decomposed"
    assert resolve_attention("auto", "tensorrt", 23) == "onnx"
    assert resolve_attention("onnx", "onnxruntime", 24) == "onnx"
    with pytest.raises(DllmExportError, match=r"--attention onnx: the Attention op needs "
                                              r"--opset 23 or later \(got 18\)"):
        ExportOptions(attention="onnx")
    with pytest.raises(DllmExportError, match=r"--attention mha: .* TensorRT cannot parse"):
        ExportOptions(attention="mha", target="tensorrt")
    with pytest.raises(DllmExportError, match=r"--attention 'flash': choose one of auto, mha"):
        ExportOptions(attention="flash")


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream", "llada2"])
def test_onnx_runtime_exports_run_multi_head_attention_in_every_graph(family, artifact):
    """The default target: com.microsoft::MultiHeadAttention in the canvas and each cached
    graph (LLaDA2 and Dream with grouped key/value heads, LLaDA2 block-causal), validated
    against PyTorch on unpadded canvases (the If's unmasked branch), a left-padded one (its
    masked branch) and every cached call."""
    directory = artifact(family)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert_validated(manifest)
    assert manifest["attention"] == {"form": "mha", "requested": "auto",
                                     "target": "onnxruntime", "rope": "com.microsoft"}
    layers = LAYERS[family]
    canvas = op_counts(directory / "model.onnx", recursive=False)
    assert canvas["If"] == layers and canvas["Softmax"] == 0  # one If per layer
    assert op_counts(directory / "model.onnx")["MultiHeadAttention"] == 2 * layers
    for graph in GRAPHS:
        counts = op_counts(directory / graph)
        if graph != "model.onnx":
            assert counts["MultiHeadAttention"] == layers and counts["Softmax"] == 0, graph
        # RoPE fused: one op for queries and one for keys per layer, no rotate_half left
        assert counts["RotaryEmbedding"] == 2 * layers and counts["Neg"] == 0, graph
        assert counts["Reciprocal"] == 0, graph  # passes.divide_by_norm
    findings = manifest["trt_compatibility"]["findings"]
    assert {f["op"] for f in findings} <= {"com.microsoft::MultiHeadAttention",
                                           "com.microsoft::RotaryEmbedding",
                                           "com.microsoft::MoE"}


def test_onnx_runtime_fuses_every_rms_norm(artifact, tmp_path):
    """After passes.divide_by_norm ONNX Runtime's optimizer turns each RMSNorm (two per
    layer and the final one) into one SimplifiedLayerNormalization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      "optimized.onnx.data")
    ort.InferenceSession(str(artifact("llada") / "model.onnx"), options,
                         providers=["CPUExecutionProvider"])
    counts = op_counts(tmp_path / "optimized.onnx", recursive=False)
    assert counts["SimplifiedLayerNormalization"] == 2 * LAYERS["llada"] + 1
    assert counts["Pow"] == counts["Sqrt"] == 0


def test_unpadded_branch_drops_the_mask(artifact):
    """The then-branch runs MultiHeadAttention on q, k, v alone (ONNX Runtime's flash path);
    the else-branch keeps the key-padding mask."""
    model = onnx.load(str(artifact("llada") / "model.onnx"), load_external_data=False)
    branches = [n for n in model.graph.node if n.op_type == "If"]
    assert branches
    for node in branches:
        bodies = {a.name: a.g for a in node.attribute}
        (plain,), (masked,) = bodies["then_branch"].node, bodies["else_branch"].node
        assert plain.op_type == masked.op_type == "MultiHeadAttention"
        assert len([i for i in plain.input if i]) == 3
        assert masked.input[4] and list(masked.input[:3]) == list(plain.input[:3])
    condition = {n.output[0]: n for n in model.graph.node}[branches[0].input[0]]
    assert condition.op_type == "Greater"


@pytest.mark.slow
@pytest.mark.parametrize("family,opset,form", [
    ("llada", 18, "decomposed"), ("llada-moe", 18, "decomposed"),
    ("dream", 23, "onnx"), ("llada2", 23, "onnx")])
def test_tensorrt_exports_are_clean_and_valid(family, opset, form, tiny_dir, tmp_path):
    """--target tensorrt: the ONNX Attention op at opset 23 (TensorRT's IAttention; grouped
    heads native), else the pre-scaled MatMul / Softmax / MatMul pattern; check-trt clean
    for every graph, and validated on ONNX Runtime against PyTorch."""
    manifest = export_model(tiny_dir(family), tmp_path / "art", ExportOptions(
        seq_len=SEQ_LEN, target="tensorrt", opset=opset, moe="dense", cache=True,
        block_length=ARTIFACT_BLOCK, window=16))
    assert_validated(manifest)
    assert manifest["attention"]["form"] == form
    assert manifest["attention"]["rope"] == ("onnx" if form == "onnx" else "decomposed")
    assert manifest["trt_compatibility"]["clean"], manifest["trt_compatibility"]["findings"]
    layers = LAYERS[family]
    for graph in GRAPHS:
        model = onnx.load(str(tmp_path / "art" / graph), load_external_data=False)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, graph
        counts = op_counts(tmp_path / "art" / graph)
        assert counts["MultiHeadAttention"] == 0 and counts["If"] == 0, graph
        assert counts["Attention" if form == "onnx" else "Softmax"] == layers, graph
        # the standard RotaryEmbedding (TensorRT's IRotaryEmbeddingLayer) with Attention
        assert counts["RotaryEmbedding"] == (2 * layers if form == "onnx" else 0), graph


def test_check_trt_reads_if_bodies(tmp_path):
    """A contrib op inside an If branch is still one TensorRT cannot parse."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    then_body = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["a"], domain="com.microsoft", name="inner")],
        "then", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    else_body = helper.make_graph([helper.make_node("Relu", ["x"], ["b"])], "else", [],
                                  [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["y"], then_branch=then_body,
                                                else_branch=else_body)], "g", [x, flag], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "if.onnx"))
    findings = check_trt(tmp_path / "if.onnx")
    assert [(f.node, f.op) for f in findings] == [("inner", "com.microsoft::FastGelu")]


def test_fused_attention_op_matches_sdpa_with_grouped_heads():
    """The custom op's eager body (the reference the lowerings are validated against) is the
    plain attention, with a key-padding bias and with a full visibility bias."""
    import torch

    from dllm_export.models.layers import attention, fused_attention, padding_bias

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=generator)
    k, v = (torch.randn(2, 2, 6, 8, generator=generator) for _ in range(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    keys = padding_bias(mask, torch.float32)
    reference = torch.softmax(
        q @ k.repeat_interleave(2, 1).transpose(-1, -2) / np.sqrt(8) + keys, -1
    ) @ v.repeat_interleave(2, 1)
    expected = reference.transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(fused_attention(q, k, v, keys, True), expected)
    torch.testing.assert_close(attention(q, k, v, keys), expected)


def test_unwrapped_graph_computes_the_same_predictions(artifact, tmp_path):
    """passes.unwrap_unpadded_mask (what the quantisers see) keeps the masked node: the same
    outputs as the If graph on an unpadded and on a left-padded canvas, to float rounding."""
    import onnxruntime as ort

    from dllm_export.export.passes import unwrap_unpadded_mask

    directory = artifact("llada")
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    unwrap_unpadded_mask(model)
    assert "If" not in {n.op_type for n in model.graph.node}
    onnx.save(model, str(directory / "unwrapped.onnx"))  # beside its external weights
    try:
        sessions = [ort.InferenceSession(str(directory / name), providers=["CPUExecutionProvider"])
                    for name in ("model.onnx", "unwrapped.onnx")]
        ids = np.random.default_rng(0).integers(0, 300, size=(1, SEQ_LEN))
        for pad in (0, 5):
            mask = np.ones_like(ids)
            mask[:, :pad] = 0
            feeds = {"input_ids": ids, "attention_mask": mask}
            fused, unwrapped = (s.run(["topk_logprobs"], feeds)[0] for s in sessions)
            np.testing.assert_allclose(unwrapped, fused, atol=1e-5)
    finally:
        (directory / "unwrapped.onnx").unlink()


@pytest.mark.parametrize("opset,op", [(18, "com.microsoft::RotaryEmbedding"),
                                      (23, "::RotaryEmbedding")])
@pytest.mark.parametrize("dtype,full_precision", [("float32", False), ("float16", True),
                                                   ("float16", False)])
def test_rope_lowering_matches_apply_rope(opset, op, dtype, full_precision, tmp_path):
    """``dllm_export::rope`` lowered (the contrib op before opset 23, the standard one from
    it) equals ``apply_rope`` in PyTorch: a batch of two rows at different positions (the
    cached graphs' position_ids), partial rotary (24 of 32 channels), float32 and float16
    activations with and without LLaDA's full-precision rotation. Tolerance: float32 1e-5
    (the graph's Cos / Sin of angles up to 11 radians differ from PyTorch's in the last
    bits); float16 one half-precision rounding of values below 2 (2e-3)."""
    import onnxruntime as ort
    import torch

    from dllm_export.export.onnx_attention import translation_table
    from dllm_export.models.layers import apply_rope, rope_tables, trace_fused_attention

    torch_dtype = getattr(torch, dtype)

    class Rope(torch.nn.Module):
        def forward(self, x, positions):
            cos, sin = rope_tables(positions, 24, 10000.0)
            return apply_rope(x, cos, sin, full_precision)

    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    with trace_fused_attention(), torch.no_grad():
        program = torch.onnx.export(Rope().eval(), (x, positions), None, dynamo=True,
                                    opset_version=opset, input_names=["x", "positions"],
                                    custom_translation_table=translation_table("mha", opset))
    program.save(str(tmp_path / "rope.onnx"))
    model = onnx.load(str(tmp_path / "rope.onnx"))
    assert [f"{n.domain}::{n.op_type}" for n in model.graph.node
            if n.op_type == "RotaryEmbedding"] == [op]
    session = ort.InferenceSession(str(tmp_path / "rope.onnx"),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy(), "positions": positions.numpy()})
    expected = Rope()(x, positions).float().numpy()
    np.testing.assert_allclose(out.astype(np.float32), expected,
                               atol=1e-5 if dtype == "float32" else 2e-3)
    np.testing.assert_array_equal(out[..., 24:], x[..., 24:].numpy())  # the rest untouched
