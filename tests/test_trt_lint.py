"""check-trt on hand-made graphs: each rule fires on the node that breaks it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dllm_export.export.trt_lint import check_trt


def _save(tmp_path, nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "bad", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    return path


def _reasons(path):
    return {(f.node, f.severity, f.reason) for f in check_trt(path)}


def test_hand_made_bad_graph_lists_every_offender(tmp_path):
    f32 = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f32, [4, 8])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [4, 1])
    out = helper.make_tensor_value_info("y", f32, None)
    inits = [
        numpy_helper.from_array(np.array([5000], dtype=np.int64), "k_big"),
        numpy_helper.from_array(np.zeros((4, 8), dtype=np.float32), "upd"),
        numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(3, dtype=np.int8), "zp"),
        numpy_helper.from_array(np.ones((8, 8), dtype=np.int8), "w_q"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("TopK", ["x", "k_big"], ["tv", "ti"], name="topk_big", axis=1),
        helper.make_node("ScatterND", ["x", "idx", "upd"], ["s"], name="scatter_add",
                         reduction="add"),
        helper.make_node("DequantizeLinear", ["w_q", "scale", "zp"], ["w"], name="dq_zp"),
        helper.make_node("MatMulInteger", ["w_q", "w_q"], ["mi"], name="matmul_integer"),
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("MoE", ["x", "x", "x", "", "x"], ["m"], name="contrib_moe",
                         domain="com.microsoft"),
        helper.make_node("Cast", ["idx"], ["idx_f"], name="cast", to=TensorProto.INT64),
        helper.make_node("CumSum", ["idx", "axis"], ["cs"], name="cumsum_int64"),
        helper.make_node("Add", ["x", "upd"], ["y"], name="fine_add"),
    ]
    path = _save(tmp_path, nodes, [x, idx], [out], inits)
    reasons = _reasons(path)
    assert ("topk_big", "error", "K = 5000 must be < 3840") in reasons
    assert ("scatter_add", "error", "reduction 'add' is not supported (only 'none')") in {
        (n, s, r.replace("b'add'", "'add'")) for n, s, r in reasons}
    assert ("dq_zp", "error", "zero point must be 0 (TensorRT quantisation is symmetric)") in reasons
    assert ("matmul_integer", "error", "not supported by TensorRT's ONNX parser") in reasons
    assert any(n == "nonzero" and "data-dependent" in r for n, _, r in reasons)
    assert ("contrib_moe", "error", "custom-domain op: TensorRT needs a plugin for it") in reasons
    assert any(n == "cumsum_int64" and "INT64 is not supported" in r for n, _, r in reasons)
    flagged = {n for n, _, _ in reasons}
    assert "fine_add" not in flagged and "cast" not in flagged


def test_topk_must_be_sorted_and_constant(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    out = helper.make_tensor_value_info("v", TensorProto.FLOAT, None)
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1, sorted=0)]
    reasons = _reasons(_save(tmp_path, nodes, [x, k], [out]))
    assert ("topk", "error", "sorted must be 1") in reasons
    assert ("topk", "error", "K must be a build-time constant") in reasons


def test_opset_outside_tensorrt_range(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [out], opset=25)
    assert any(f.op == "opset" and f.severity == "error" for f in check_trt(path))
