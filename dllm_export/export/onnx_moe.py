"""Lowering ``dllm_export::moe_swiglu`` to ONNX Runtime's ``com.microsoft::MoE`` contrib op.

On the CPU the op only runs interleaved SwiGLU (``swiglu_fusion=1``) without fc3, and it
takes router *logits* (it applies the softmax itself). ``normalize_routing_weights=0`` keeps
LLaDA-MoE's no-renormalisation rule. TensorRT cannot run this op: use it for ONNX Runtime
targets only (check-trt reports it).
"""

from __future__ import annotations

import onnx
import onnx.defs


def _register_schema() -> None:
    """onnxscript refuses ops without a schema; ONNX ships none for contrib ops."""
    if onnx.defs.has("MoE", "com.microsoft"):
        return
    Param = onnx.defs.OpSchema.FormalParameter
    Attr = onnx.defs.OpSchema.Attribute
    Option = onnx.defs.OpSchema.FormalParameterOption
    attr_types = {
        "k": onnx.AttributeProto.INT,
        "activation_type": onnx.AttributeProto.STRING,
        "normalize_routing_weights": onnx.AttributeProto.INT,
        "swiglu_fusion": onnx.AttributeProto.INT,
        "activation_alpha": onnx.AttributeProto.FLOAT,
        "activation_beta": onnx.AttributeProto.FLOAT,
    }
    inputs = [Param("input", "T"), Param("router_probs", "T"), Param("fc1_experts_weights", "T"),
              Param("fc1_experts_bias", "T", param_option=Option.Optional),
              Param("fc2_experts_weights", "T")]
    schema = onnx.defs.OpSchema(
        "MoE", "com.microsoft", 1,
        inputs=inputs,
        outputs=[Param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[Attr(name, kind, "", required=False) for name, kind in attr_types.items()],
    )
    onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export(dynamo=True)``."""
    import onnxscript
    import torch

    import dllm_export.models.moe  # noqa: F401  (registers the custom op)

    _register_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def moe_swiglu(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
        return msft.MoE(
            x, router_logits, fc1, None, fc2,
            k=top_k, activation_type="swiglu", swiglu_fusion=1,
            normalize_routing_weights=int(normalize),
            activation_alpha=1.0, activation_beta=0.0,
        )

    return {torch.ops.dllm_export.moe_swiglu.default: moe_swiglu}
