"""The graph contract: every graph's inputs and outputs, written once.

The exporter traces to it, every backend feeds it, ``plan`` sizes it, calibration records
for it and docs/architecture.md prints it (``python -m dllm_export.contract``). Torch-free.
An artifact's manifest carries ``contract_version`` and, per graph, the specs below; a
runtime refuses a version it does not know.

Graphs (fixed shapes; ``B`` batch, ``L`` canvas, ``Lq`` a graph's query rows, ``C`` the
cache capacity, which equals ``L``: slot ``j`` holds canvas position ``j``):

* ``canvas`` (``model.onnx``): the full canvas, bidirectional with a key-padding mask; the
  decode head already shifted (row p predicts position p).
* ``prefill``: the full canvas under any ``attention_mask`` ``[B, L, L]``; every
  position's keys and values come out, so one call fills the cache.
* ``draft`` (families decoded draft-and-verify, instead of ``step`` and ``window``): a
  block of pending tokens and a block of masks, ``2 * block_length`` rows, under the mask
  ``runtime/attention.draft_verify_mask`` builds.
* ``rows`` (bidirectional families, with the cached graphs): the canvas graph's inputs and
  a ``head_rows`` input of ``W`` rows (the block length); the decode head of those rows
  only, in their order, as computed (unshifted, like the cached graphs: a shifted family's
  row r predicts r + 1 and the runtime asks for the rows before). Without a cache
  (``--cache none``) a step reads only the block's rows, and the output projection and the
  head over all ``L`` rows are most of a large vocabulary's step.
* ``step`` / ``window`` / ``decode`` / ``draft``: ``Lq`` queries (a block, a block plus the masked
  suffix, one token) attend to ``[past | their own keys]`` under ``attention_mask``
  ``[B, Lq, C + Lq]``; their own keys and values come out.

The cached graphs return rows as computed: for families with ``shift_logits`` row r
predicts the position after query r. Keys are stored after RoPE, one input and one output
per layer and kind in ``[B, Hkv, C, Dh]`` (BNSH, the layout of ONNX Runtime's attention
ops and TensorRT's KVCacheUpdate); the runtime writes presents into the cache (in place:
the cache is never copied whole by a step). ``CACHE_KINDS`` names the per-layer state; a
family with more state (a convolution state, a delayed value) adds kinds, and every stage
picks them up from the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dllm_export.errors import DllmExportError

CONTRACT_VERSION = 3  # 1: the canvas graph only; 2: the cached graphs; 3: the rows graph
CACHED_GRAPHS = ("prefill", "step", "window", "decode")
DECODE_OUTPUTS = ("topk_ids", "topk_logprobs", "neg_entropy", "special_logprobs")
CACHE_KINDS = ("key", "value")
CACHE_LAYOUT = "BNSH"  # [batch, kv heads, slots, head dim]
# "draft": draft-and-verify decoding (runtime/tidar.py): a block of pending tokens and a
# block of masks; exported instead of step and window for the families that decode that
# way (families.Family.cached_graphs)
FILES = {"canvas": "model.onnx", "prefill": "prefill.onnx", "step": "step.onnx",
         "window": "window.onnx", "decode": "decode.onnx", "draft": "draft.onnx",
         "rows": "rows.onnx"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list
    dtype: str
    meaning: str


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    queries: int  # Lq
    capacity: int  # C; 0 for graphs without past inputs
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(data["name"], data["file"], data["queries"], data["capacity"],
                   [TensorSpec(**t) for t in data["inputs"]],
                   [TensorSpec(**t) for t in data["outputs"]])


def head_outputs(batch: int, rows: int, topk: int, specials: int) -> list[TensorSpec]:
    """The decode head (runtime/prediction.py) over ``rows`` positions."""
    return [
        TensorSpec("topk_ids", [batch, rows, topk], "int64",
                   "the K most likely tokens per row, best first"),
        TensorSpec("topk_logprobs", [batch, rows, topk], "float32",
                   "their log-probabilities over the whole vocabulary"),
        TensorSpec("neg_entropy", [batch, rows], "float32", "sum p log(p + 1e-10) per row"),
        TensorSpec("special_logprobs", [batch, rows, specials], "float32",
                   "log-probabilities of special_ids (EOS, EoT)"),
    ]


def canvas_graph(batch: int, length: int, topk: int, specials: int, vocab: int,
                 outputs: str = "decode") -> GraphSpec:
    inputs = [
        TensorSpec("input_ids", [batch, length], "int64",
                   "canvas: left-padded prompt, committed tokens, mask ids"),
        TensorSpec("attention_mask", [batch, length], "int64",
                   "1 for real tokens, 0 for left padding"),
    ]
    if outputs == "logits":
        out = [TensorSpec("logits", [batch, length, vocab], "float32",
                          "full logits; row p predicts position p")]
    else:
        out = head_outputs(batch, length, topk, specials)
    return GraphSpec("canvas", FILES["canvas"], length, 0, inputs, out)


def rows_graph(batch: int, length: int, rows: int, topk: int, specials: int) -> GraphSpec:
    """The ``rows`` graph: the full canvas, the decode head over ``rows`` chosen positions."""
    canvas = canvas_graph(batch, length, topk, specials, 0)
    chosen = TensorSpec("head_rows", [rows], "int64",
                        "the rows whose predictions come out, in this order (as computed: "
                        "a shifted family's row r predicts position r + 1)")
    return GraphSpec("rows", FILES["rows"], rows, 0, [*canvas.inputs, chosen],
                     head_outputs(batch, rows, topk, specials))


KIND_MEANINGS = {"key": "keys of one layer, after RoPE", "value": "values of one layer",
                 "conv": "the convolution's input (CCA's q/k projections) of one layer",
                 "delayed": "the delayed value projection (CCA) of one layer"}


def cache_names(layers: int, prefix: str, kinds=CACHE_KINDS) -> list[str]:
    """``past_key_0, past_value_0, past_key_1, ...`` (or ``present_...``), layer-major, in
    the family's per-layer order of ``kinds``."""
    return [f"{prefix}_{kind}_{layer}" for layer in range(layers) for kind in kinds]


def cached_graph(name: str, batch: int, queries: int, capacity: int, layers: int,
                 kv_heads: int, head_dim: int, cache_dtype: str, topk: int,
                 specials: int, kinds: tuple | None = None) -> GraphSpec:
    """The spec of a cached graph: ``prefill`` (no past) or ``step``/``window``/``decode``.

    ``kinds``: ``(kind, heads, width)`` per per-layer state in the family's order (default:
    keys and values of ``kv_heads`` x ``head_dim``); every state is ``[B, heads, slots,
    width]`` with the slot axis third, so the runtime writes every kind the same way."""
    if name not in FILES or name in ("canvas", "rows"):
        raise ValueError(f"unknown cached graph {name!r}")
    kinds = kinds or tuple((kind, kv_heads, head_dim) for kind in CACHE_KINDS)
    names = [kind for kind, _, _ in kinds]
    past = 0 if name == "prefill" else capacity
    inputs = [
        TensorSpec("input_ids", [batch, queries], "int64", "the query rows' tokens"),
        TensorSpec("position_ids", [batch, queries], "int64", "their RoPE positions"),
        TensorSpec("attention_mask", [batch, queries, past + queries], "bool",
                   "True where a query may attend to a key: the past slots, then the rows"),
    ]
    shapes = {kind: (heads, width) for kind, heads, width in kinds}
    for tensor in cache_names(layers, "past", names) if past else []:
        kind = tensor.split("_")[1]
        heads, width = shapes[kind]
        inputs.append(TensorSpec(tensor, [batch, heads, capacity, width], cache_dtype,
                                 "cached " + KIND_MEANINGS[kind]))
    outputs = head_outputs(batch, queries, topk, specials)
    for tensor in cache_names(layers, "present", names):
        kind = tensor.split("_")[1]
        heads, width = shapes[kind]
        outputs.append(TensorSpec(tensor, [batch, heads, queries, width], cache_dtype,
                                  "the rows' own " + KIND_MEANINGS[kind]))
    return GraphSpec(name, FILES[name], queries, past, inputs, outputs)


def cached_rows(name: str, length: int, block_length: int, window: int, shift: int) -> int:
    """Query rows of each cached graph: the canvas (prefill), a block (step), the longest
    block-plus-suffix of prefix caching (window), one token (decode); a shifted family
    feeds one position more (the one before the block)."""
    return {"prefill": length, "step": block_length + shift, "window": window + shift,
            "decode": 1, "draft": 2 * block_length, "rows": block_length}[name]


def check_version(manifest: dict, origin: str) -> int:
    """The manifest's contract version, refused in one line when this runtime is older."""
    version = manifest.get("contract_version", 1)
    if not isinstance(version, int) or version < 1 or version > CONTRACT_VERSION:
        raise DllmExportError(
            f"{origin}: graph contract version {version!r}; this dllm-export reads versions "
            f"1 to {CONTRACT_VERSION}: upgrade dllm-export or re-export the artifact")
    return version


def graph_specs(manifest: dict, origin: str = "manifest.json") -> dict[str, GraphSpec]:
    """The cached graphs an artifact holds (empty for canvas-only artifacts)."""
    check_version(manifest, origin)
    graphs = (manifest.get("cache") or {}).get("graphs") or {}
    try:
        return {name: GraphSpec.from_dict(spec) for name, spec in graphs.items()}
    except (KeyError, TypeError) as err:
        raise DllmExportError(f"{origin}: cache.graphs is malformed ({err}); re-export") from None


def markdown_table(spec: GraphSpec) -> str:
    rows = [f"| `{t.name}` | {t.shape} | {t.dtype} | {t.meaning} |"
            for t in spec.inputs + spec.outputs]
    return "\n".join(["| name | shape | dtype | meaning |", "|---|---|---|---|", *rows])


if __name__ == "__main__":  # the tables in docs/architecture.md
    example = dict(batch=1, capacity=96, layers=2, kv_heads=4, head_dim=64,
                   cache_dtype="float32", topk=8, specials=2)
    print(markdown_table(canvas_graph(1, 96, 8, 2, 2048)))
    print("\nrows:\n")
    print(markdown_table(rows_graph(1, 96, 32, 8, 2)))
    for graph, rows in (("prefill", 96), ("step", 32), ("decode", 1)):
        print(f"\n{graph}:\n")
        print(markdown_table(cached_graph(graph, queries=rows, **example)))
