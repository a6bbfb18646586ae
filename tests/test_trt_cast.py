"""export/trt_cast.py: the fp16/bf16 cast pass TensorRT 11's strongly typed networks need,
checked against the fp32 graph it came from (ONNX Runtime CPU for fp16, onnx's reference
evaluator for bf16, which ONNX Runtime's CPU provider has no kernels for)."""

from __future__ import annotations

import numpy as np
import pytest

from dllm_export.errors import DllmExportError
from dllm_export.export.trt_cast import cast_graph, kept_nodes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def moe_graph(artifact):
    return artifact("llada-moe", target="tensorrt") / "model.onnx"


def _feeds(length=48, seed=0):
    ids = np.random.default_rng(seed).integers(0, 300, size=(1, length), dtype=np.int64)
    ids[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _fp32(graph, feeds):
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds),
                    strict=True))


def test_kept_nodes_are_norms_router_and_decode_head(moe_graph):
    graph = onnx.load(str(moe_graph), load_external_data=False).graph
    kept = set(kept_nodes(graph))
    by_name = {node.name: node for node in graph.node}
    assert any("input_layernorm" in name for name in kept)
    assert any(name.endswith("mlp.gate/Gemm") for name in kept)  # the router
    assert not any("gate_proj" in name or "lm_head" in name for name in kept)
    head_ops = {by_name[name].op_type for name in kept if "layers" not in name
                and "norm" not in name}
    assert {"LogSoftmax", "TopK"} <= head_ops  # downstream of the LM head


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_graph_is_typed_valid_and_close_to_fp32(tmp_path, moe_graph, precision):
    target = tmp_path / "model.onnx"
    done = cast_graph(moe_graph, target, precision)
    model = onnx.load(str(target))
    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    # a consistent strongly typed graph: strict type inference finds no clash
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model)
    floats = (onnx.TensorProto.FLOAT, low)
    matrices = [t for t in model.graph.initializer if len(t.dims) == 2
                and t.data_type in floats]
    assert matrices and all(t.data_type == low for t in matrices
                            if "norm" not in t.name and not t.name.endswith("mlp.gate.weight"))
    assert {i.type.tensor_type.elem_type for i in model.graph.output} == {
        onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}  # the engine's I/O is unchanged
    assert done["precision"] == precision and done["converted_initializers"] == len(
        [t for t in model.graph.initializer if t.data_type == low])
    # kept nodes compute in fp32: every float input of theirs is fp32
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    keep = set(kept_nodes(onnx.load(str(moe_graph), load_external_data=False).graph))
    checked = [node for node in inferred.graph.node if node.name in keep]
    assert len(checked) == len(keep)
    for node in checked:
        assert low not in {types.get(name) for name in node.input}, node.name
    feeds = _feeds()
    want = _fp32(moe_graph, feeds)
    if precision == "fp16":
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = dict(zip(want, session.run(list(want), feeds), strict=True))
        tolerance = 1e-2  # fp16 matrices over 2 layers: measured 2e-3
    else:
        from onnx.reference import ReferenceEvaluator

        got = dict(zip(want, ReferenceEvaluator(model).run(list(want), feeds), strict=True))
        tolerance = 5e-2  # bf16's 8-bit mantissa: measured 1.6e-2
    np.testing.assert_allclose(np.asarray(got["topk_logprobs"][..., 0], np.float32),
                               want["topk_logprobs"][..., 0], atol=tolerance)
    np.testing.assert_allclose(np.asarray(got["neg_entropy"], np.float32),
                               want["neg_entropy"], atol=tolerance)


def test_unreadable_graph_is_one_line(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(DllmExportError, match=r"model.onnx: the cast pass cannot read this "
                                              r"graph .*re-export the artifact$"):
        cast_graph(bad, tmp_path / "out.onnx", "fp16")
    with pytest.raises(DllmExportError, match="precision 'int8' is not fp16 or bf16"):
        cast_graph(bad, tmp_path / "out.onnx", "int8")
