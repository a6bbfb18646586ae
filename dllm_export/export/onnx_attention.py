"""Lowering ``dllm_export::attention`` and ``dllm_export::rope`` (models/layers.py) to
the target's fused ops.

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

With either fused form ``dllm_export::rope`` (``layers.apply_rope``'s rotation) becomes one
RoPE op per query and key tensor (``rope_form``): the standard ``RotaryEmbedding`` from
opset 23, else ``com.microsoft::RotaryEmbedding``.

The custom ops' eager bodies are the reference every lowering is validated against.
"""

from __future__ import annotations

import numpy as np

from dllm_export.errors import DllmExportError

ATTENTION_FORMS = ("auto", "mha", "onnx", "decomposed")
ONNX_ATTENTION_OPSET = 23
ONNX_ROPE_OPSET = 23


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


def _register_contrib_schemas() -> None:
    """onnxscript refuses ops without a schema; ONNX ships none for contrib ops."""
    import onnx
    import onnx.defs

    Param = onnx.defs.OpSchema.FormalParameter
    Attr = onnx.defs.OpSchema.Attribute
    floats = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")
    if not onnx.defs.has("RotaryEmbedding", "com.microsoft"):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "RotaryEmbedding", "com.microsoft", 1,
            inputs=[Param("input", "T"), Param("position_ids", "M"), Param("cos_cache", "T"),
                    Param("sin_cache", "T")],
            outputs=[Param("output", "T")],
            type_constraints=[floats, ("M", ["tensor(int64)"], "")],
            attributes=[Attr(name, onnx.AttributeProto.INT, "", required=False)
                        for name in ("interleaved", "rotary_embedding_dim", "num_heads",
                                     "is_packed_batching")],
        ))
    if onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        return
    Option = onnx.defs.OpSchema.FormalParameterOption
    optional = ("bias", "key_padding_mask", "attention_bias", "past_key", "past_value")
    types = {"key_padding_mask": "M"}
    inputs = [Param("query", "T"), Param("key", "T"), Param("value", "T")]
    inputs += [Param(name, types.get(name, "T"), param_option=Option.Optional)
               for name in optional]
    schema = onnx.defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=inputs,
        outputs=[Param("output", "T")],
        type_constraints=[floats, ("M", ["tensor(int32)"], "")],
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
    _register_contrib_schemas()

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

    def lower_rope(x, cos, sin, full_precision: bool):
        """[B, H, L, R] rotated by the tables' first halves ([B, 1, L, R] each, halves
        repeated): the standard RotaryEmbedding where the opset has it, else ONNX Runtime's
        (which indexes its tables by position: the batch's rows are laid end to end)."""
        batch, heads, length, rotary_dim = _dims(x)
        rows = batch * length if opset < ONNX_ROPE_OPSET else None
        cos, sin = (op.Reshape(op.Slice(t, [0], [rotary_dim // 2], [3]),
                               shape(rows, rotary_dim // 2) if rows else
                               shape(batch, length, rotary_dim // 2)) for t in (cos, sin))
        value = op.Cast(x, to=onnx.TensorProto.FLOAT) if full_precision else x
        cos, sin = op.CastLike(cos, value), op.CastLike(sin, value)
        # as [B, L, H*R]: the transposes around it then cancel against split_heads' and the
        # attention lowering's (a BNSH RoPE node would keep both in the graph)
        value = op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]),
                           shape(batch, length, heads * rotary_dim))
        if rows:
            positions = op.Constant(value=onnx.numpy_helper.from_array(
                np.arange(rows, dtype=np.int64).reshape(batch, length)))
            out = msft.RotaryEmbedding(value, positions, cos, sin, interleaved=0,
                                       num_heads=heads)
        else:
            out = op.RotaryEmbedding(value, cos, sin, interleaved=0, num_heads=heads)
        out = op.Transpose(op.Reshape(out, shape(batch, length, heads, rotary_dim)),
                           perm=[0, 2, 1, 3])
        return op.CastLike(out, x) if full_precision else out

    lower = lower_mha if form == "mha" else lower_onnx
    return {torch.ops.dllm_export.attention.default: lower,
            torch.ops.dllm_export.rope.default: lower_rope}


def rope_form(form: str, opset: int) -> str:
    """How an export lowers RoPE (every family's ``layers.apply_rope``): with the fused
    attention forms, the standard ``RotaryEmbedding`` op from opset 23 (ONNX Runtime and
    TensorRT's IRotaryEmbeddingLayer take it), before it ONNX Runtime's contrib op;
    decomposed attention keeps the decomposed rotation (Mul / Neg / Concat / Add)."""
    if form == "decomposed":
        return "decomposed"
    return "onnx" if opset >= ONNX_ROPE_OPSET else "com.microsoft"
