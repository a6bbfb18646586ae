"""Which linear layers ONNX Runtime runs as integer kernels, read from its optimised graph.

A Q/DQ graph only says what *may* run in integers: ONNX Runtime's graph optimiser fuses a
``DequantizeLinear -> MatMul (-> QuantizeLinear)`` group into ``QLinearMatMul`` or
``MatMulIntegerToFloat`` only when the group matches its selectors (among them: each
``DequantizeLinear`` feeds one node). Whatever it leaves unfused dequantises its weight
every step and runs a float ``MatMul``. ``integer_coverage`` opens the graph the way the
runtime does (CPU, every optimisation on), saves the optimised graph
(``SessionOptions.optimized_model_filepath``) and counts.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

# Contrib and standard ops that multiply in integers on ONNX Runtime CPU.
INTEGER_OPS = ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm")
# Weight-only blocks: integer weights, and integer arithmetic at accuracy_level 4.
NBITS_OPS = ("MatMulNBits",)
FLOAT_OPS = ("MatMul", "FusedMatMul", "Gemm")


def _weight_bearing(node, constants: set[str]) -> bool:
    return len(node.input) > 1 and node.input[1] in constants


def count_kernels(model) -> dict:
    """Linear-layer kernels of an (optimised) ONNX graph: integer, weight-only and float.

    A float MatMul counts as a linear layer when its second input is a weight: an
    initializer, or the output of a ``DequantizeLinear`` of one (a Q/DQ weight left
    unfused). Attention's activation-by-activation MatMuls are not linear layers.
    """
    initializers = {init.name for init in model.graph.initializer}
    dequantized = {
        node.output[0]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    }
    constants = initializers | dequantized
    ops = Counter()
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS or node.op_type in NBITS_OPS:
            ops[node.op_type] += 1
        elif node.op_type in FLOAT_OPS and _weight_bearing(node, constants):
            ops[node.op_type] += 1
    integer = sum(ops[op] for op in INTEGER_OPS)
    nbits = sum(ops[op] for op in NBITS_OPS)
    floating = sum(ops[op] for op in FLOAT_OPS)
    return {
        "linear_layers": integer + nbits + floating,
        "integer": integer,
        "weight_only": nbits,
        "float": floating,
        "ops": dict(sorted(ops.items())),
    }


def integer_coverage(graph: Path, threads: int = 1) -> dict:
    """``count_kernels`` of ``graph`` after ONNX Runtime CPU's full graph optimisation."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="dllm-kernels-") as scratch:
        optimised = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(optimised)
        # The weights go to a side file: a graph over 2 GB cannot be one protobuf.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = ort.InferenceSession(str(graph), options,
                                       providers=["CPUExecutionProvider"])
        del session
        counts = count_kernels(onnx.load(str(optimised), load_external_data=False))
    counts["measured_on"] = (f"onnxruntime {ort.__version__} CPUExecutionProvider, "
                             "ORT_ENABLE_ALL")
    return counts


def artifact_kernels(directory: Path, manifest: dict) -> dict:
    """``integer_coverage`` of the canvas graph and of every cached graph, by graph name.
    (Not for FP8 Q/DQ graphs, which ONNX Runtime CPU cannot run.)"""
    graphs = {"canvas": directory / manifest["graph"]["file"]}
    for name, spec in ((manifest.get("cache") or {}).get("graphs") or {}).items():
        graphs[name] = directory / spec["file"]
    return {name: integer_coverage(path) for name, path in graphs.items()}
