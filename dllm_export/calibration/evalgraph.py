"""Run a quantised graph for the quality gate, including FP8 graphs that ONNX Runtime's CPU
provider refuses.

``GraphBackend`` is a runtime ``Backend`` over an in-memory graph whose weights stay in the
artifact's folder: the logits variant of a candidate that is not yet a valid artifact.

``fake_quant_fp8`` makes FP8 graphs measurable on a CPU: every ``QuantizeLinear`` to
float8 e4m3 becomes ``Div(scale) -> Cast(float8e4m3fn, saturate)`` and every
``DequantizeLinear`` from it ``Cast(float) -> Mul(scale)``. The values that reach each
MatMul are exactly the e4m3-rounded, scaled values TensorRT multiplies; what differs is the
accumulation (fp32 here, fp32 in TensorRT's FP8 GEMMs too, but in another order) and
TensorRT's kernel fusions. So this judges the quantisation error, not the engine: FP8
engines are only really checked on a GPU with compute capability 8.9 or newer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dllm_export.runtime.backends.base import Backend
from dllm_export.runtime.prediction import Prediction, summarize_logits

FLOAT8 = 17  # onnx.TensorProto.FLOAT8E4M3FN


class GraphBackend(Backend):
    """ONNX Runtime CPU over a graph proto with a ``logits`` output."""

    name = "onnxruntime"
    has_logits = True
    provider = "cpu"

    def __init__(
        self, model, weights_dir: Path, manifest: dict, threads: int | None = None
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path",
            str(Path(weights_dir).resolve()),
        )
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.seq_len = manifest["shapes"]["seq_len"]
        self.batch_size = manifest["shapes"]["batch"]
        self.topk = manifest.get("topk", 8)
        self.special_ids = tuple(manifest.get("special_ids", ()))

    def _run_logits(self, input_ids, attention_mask):
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        return self.session.run(["logits"], feeds)[0]

    def _run_predict(self, input_ids, attention_mask) -> Prediction:
        return summarize_logits(
            self._run_logits(input_ids, attention_mask), self.topk, self.special_ids
        )


def _scale_for(node, initializers, weights_dir: Path, graph_values: dict):
    """The scale input of a Q/DQ node, reshaped to broadcast along its ``axis``."""
    from onnx import numpy_helper

    name = node.input[1]
    if name not in initializers:
        return name, None
    scale = numpy_helper.to_array(initializers[name], base_dir=str(weights_dir))
    if scale.ndim == 0 or scale.size == 1:
        return name, None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    rank = graph_values.get(node.input[0])
    if rank is None:
        raise ValueError(f"{node.name}: per-channel scale on a tensor of unknown rank")
    shape = [1] * rank
    shape[axis] = scale.size
    return f"{name}_broadcast", numpy_helper.from_array(
        scale.reshape(shape), f"{name}_broadcast"
    )


def fake_quant_fp8(model, weights_dir: Path):
    """A copy of ``model`` with float8 Q/DQ pairs replaced by float rounding (see above)."""
    import copy

    from onnx import helper

    model = copy.deepcopy(model)
    initializers = {init.name: init for init in model.graph.initializer}
    ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    fp8_outputs = set()
    nodes, added = [], {}
    for node in model.graph.node:
        is_q = (
            node.op_type == "QuantizeLinear"
            and len(node.input) > 2
            and initializers.get(node.input[2]) is not None
            and initializers[node.input[2]].data_type == FLOAT8
        )
        is_dq = node.op_type == "DequantizeLinear" and node.input[0] in fp8_outputs
        if not (is_q or is_dq):
            nodes.append(node)
            continue
        scale, broadcast = _scale_for(node, initializers, weights_dir, ranks)
        if broadcast is not None:
            added[broadcast.name] = broadcast
        if is_q:
            fp8_outputs.add(node.output[0])
            if node.input[0] in ranks:
                ranks[node.output[0]] = ranks[node.input[0]]
            scaled = node.output[0] + "_scaled"
            nodes += [
                helper.make_node(
                    "Div", [node.input[0], scale], [scaled], name=node.name + "/Div"
                ),
                helper.make_node(
                    "Cast",
                    [scaled],
                    [node.output[0]],
                    to=FLOAT8,
                    saturate=1,
                    name=node.name + "/Cast",
                ),
            ]
        else:
            widened = node.output[0] + "_widened"
            nodes += [
                helper.make_node(
                    "Cast", [node.input[0]], [widened], to=1, name=node.name + "/Cast"
                ),
                helper.make_node(
                    "Mul", [widened, scale], [node.output[0]], name=node.name + "/Mul"
                ),
            ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added.values())
    del model.graph.value_info[:]
    return model


def has_fp8(model) -> bool:
    return any(init.data_type == FLOAT8 for init in model.graph.initializer)
