"""Lowering ``dllm_export::attention`` (models/layers.py) to a fused attention op.

Forms (``ATTENTION_FORMS``; ``resolve_attention`` picks one per target):

* ``mha``: ONNX Runtime's ``com.microsoft::MultiHeadAttention``. Queries, keys and values
  go in as ``[B, S, H*Dh]`` (grouped heads repeated first: the op wants as many key heads
  as query heads; with BNSH keys its CPU kernel would never take the flash path). A key-padding bias (the canvas
  graph) becomes ``key_padding_mask`` ``[B, K]``; any other bias (the cached graphs'
  visibility, block-causal for LLaDA2) goes in as ``attention_bias`` ``[B, 1, Lq, K]``.
* ``onnx``: the standard ``Attention`` op (opset 23), BNSH in and out, grouped heads
  native, the bias as a float ``attn_mask`` ``[B, 1, Lq, K]``. TensorRT's parser (10.14
  and later) maps it to its fused ``IAttention`` layer; ONNX Runtime runs it too.
* ``decomposed``: no custom op; the exporter's own MatMul / Add / Softmax / MatMul, with
  queries and keys both pre-scaled by ``Dh ** -0.25``, the primitive pattern TensorRT's
  attention fusion matches at any opset.

The custom op's eager body is the reference every lowering is validated against.
"""

from __future__ import annotations

from dllm_export.errors import DllmExportError

ATTENTION_FORMS = ("auto", "mha", "onnx", "decomposed")
ONNX_ATTENTION_OPSET = 23


def resolve_attention(form: str, target: str, opset: int) -> str:
    """The attention form an export makes. ``auto``: ``mha`` for ONNX Runtime; for
    TensorRT the ``Attention`` op where the opset has it, else the decomposed pattern."""
    if form == "auto":
        if target == "onnxruntime":
            return "mha"
        return "onnx" if opset >= ONNX_ATTENTION_OPSET else "decomposed"
    if form == "onnx" and opset < ONNX_ATTENTION_OPSET:
        raise DllmExportError(
            f"--attention onnx: the Attention op needs --opset {ONNX_ATTENTION_OPSET} or "
            f"later (got {opset})")
    if form == "mha" and target == "tensorrt":
        raise DllmExportError(
            "--attention mha: com.microsoft::MultiHeadAttention is an ONNX Runtime op that "
            "TensorRT cannot parse; use --attention onnx (with --opset 23) or decomposed")
    return form


def _register_mha_schema() -> None:
    """onnxscript refuses ops without a schema; ONNX ships none for contrib ops."""
    import onnx
    import onnx.defs

    if onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        return
    Param = onnx.defs.OpSchema.FormalParameter
    Option = onnx.defs.OpSchema.FormalParameterOption
    optional = ("bias", "key_padding_mask", "attention_bias", "past_key", "past_value")
    types = {"key_padding_mask": "M"}
    inputs = [Param("query", "T"), Param("key", "T"), Param("value", "T")]
    inputs += [Param(name, types.get(name, "T"), param_option=Option.Optional)
               for name in optional]
    Attr = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=inputs,
        outputs=[Param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[Attr("num_heads", onnx.AttributeProto.INT, "", required=True),
                    Attr("scale", onnx.AttributeProto.FLOAT, "", required=False),
                    Attr("mask_filter_value", onnx.AttributeProto.FLOAT, "", required=False),
                    Attr("unidirectional", onnx.AttributeProto.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


def _dims(value) -> list[int]:
    """Static dims of a traced value (every graph has fixed shapes)."""
    return [int(d) for d in value.shape]


def translation_table(form: str, opset: int) -> dict:
    """``custom_translation_table`` entry for ``torch.onnx.export(dynamo=True)`` at
    ``opset``."""
    import onnx
    import onnxscript
    import torch

    import dllm_export.models.layers  # noqa: F401  (registers the custom op)

    if form not in ("mha", "onnx"):
        raise ValueError(f"no lowering for attention form {form!r}")
    op = onnxscript.values.Opset("", opset)
    msft = onnxscript.values.Opset("com.microsoft", 1)
    _register_mha_schema()

    def shape(*dims):
        return op.Constant(value=onnx.helper.make_tensor("shape", onnx.TensorProto.INT64,
                                                         [len(dims)], list(dims)))

    def full_bias(bias, batch, queries, keys):
        """A bias [B, 1, 1 or Lq, K] broadcast to [B, 1, Lq, K] (the ops need Lq rows)."""
        if _dims(bias)[2] == queries:
            return bias
        return op.Expand(bias, shape(batch, 1, queries, keys))

    def lower_mha(q, k, v, bias, key_padding: bool):
        batch, heads, queries, head_dim = _dims(q)
        kv_heads, keys, value_dim = _dims(k)[1], _dims(k)[2], _dims(v)[3]
        if kv_heads != heads:  # repeat_interleave over the head axis
            groups = heads // kv_heads
            k = op.Reshape(op.Expand(op.Unsqueeze(k, [2]), shape(batch, kv_heads, groups, keys,
                                                                  head_dim)),
                           shape(batch, heads, keys, head_dim))
            v = op.Reshape(op.Expand(op.Unsqueeze(v, [2]), shape(batch, kv_heads, groups, keys,
                                                                  value_dim)),
                           shape(batch, heads, keys, value_dim))
        # All three as [B, S, H*Dh]: with BNSH keys the CPU kernel never takes its flash
        # path (MlasFlashAttention, used when there is no mask and no bias).
        query, k, v = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]),
                                  shape(batch, rows, heads * width))
                       for x, rows, width in ((q, queries, head_dim), (k, keys, head_dim),
                                              (v, keys, value_dim)))
        attrs = {"num_heads": heads, "scale": head_dim ** -0.5}
        if bias is None:
            return msft.MultiHeadAttention(query, k, v, **attrs)
        if key_padding:  # 0 where visible, the dtype's minimum where padded
            keep = op.Cast(op.Equal(op.Reshape(bias, shape(batch, keys)),
                                    op.CastLike(0.0, bias)), to=onnx.TensorProto.INT32)
            return msft.MultiHeadAttention(query, k, v, None, keep, **attrs)
        return msft.MultiHeadAttention(query, k, v, None, None,
                                       full_bias(bias, batch, queries, keys), **attrs)

    def lower_onnx(q, k, v, bias, key_padding: bool):
        batch, heads, queries, head_dim = _dims(q)
        keys, value_dim = _dims(k)[2], _dims(v)[3]
        mask = None if bias is None else full_bias(bias, batch, queries, keys)
        out = op.Attention(q, k, v, mask, scale=head_dim ** -0.5)[0]  # Y; no presents
        return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]),
                          shape(batch, queries, heads * value_dim))

    lower = lower_mha if form == "mha" else lower_onnx
    return {torch.ops.dllm_export.attention.default: lower}
