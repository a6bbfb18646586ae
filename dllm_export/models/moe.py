"""Mixture-of-Experts pieces: routers and interchangeable ways to run the experts.

Routing is a function that returns (weights, expert ids); how the experts execute is a
strategy that takes them. Routers: ``softmax_topk`` (LLaDA-MoE, OLMoE, Qwen3-MoE) and
``sigmoid_group_topk`` (LLaDA2, DeepSeek-V3: sigmoid scores, a selection-only bias,
group-limited top-k, renormalised and scaled), the latter as the ``GroupLimitedGate`` module
whose parameters keep the checkpoint's ``mlp.gate.*`` names.

Every strategy computes the same function (to float tolerance) and differs in the graph it
exports:

* ``eager``: the reference formulation, a loop over the experts that were hit with
  ``index_add_``. Fast in PyTorch, but data-dependent: it cannot be exported.
* ``dense``: every expert on every token, weighted by the sparse top-k gate. Plain 2-D
  MatMuls per expert, so the quantisers see ordinary weights. Costs E/k times the FLOPs.
* ``sparse``: token-expert pairs are grouped by expert into fixed-size blocks and one batched
  MatMul runs over the blocks. Lossless (no capacity, no dropped tokens) and static-shaped:
  no NonZero, no scatter-add; slots are unique so ScatterND runs with reduction 'none'.
* ``ort``: ONNX Runtime's fused ``com.microsoft::MoE`` contrib op (interleaved SwiGLU). The
  op routes with its own softmax top-k; for any other router the chosen experts' weights
  are handed to it as logits (log of the renormalised weights, the rest at -1e9, so its
  softmax and top-k give back exactly those experts and weights) and the output is scaled
  by the weights' sum: exact for every router.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dllm_export.errors import DllmExportError

STRATEGIES = ("eager", "dense", "sparse", "ort")
DEFAULT_BLOCK = 16
# the experts' gate activation (SwiGLU: silu; Gemma 4 / DiffusionGemma: tanh GELU)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def softmax_topk(router_logits, k: int, renormalize: bool = False, bias=None,
                 bias_in_weights: bool = True):
    """Softmax over all experts in float32, then top-k.

    ``bias`` (e.g. LLaDA-MoE's ``expert_bias``) is added to the probabilities before the
    top-k; ``bias_in_weights=False`` makes it a selection-only bias (DeepSeek-V3 style).
    Returns (weights [T, k] float32, expert ids [T, k] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    scores = probs if bias is None else probs + bias.float()
    top_scores, expert_ids = torch.topk(scores, k, dim=-1)
    weights = top_scores if (bias is None or bias_in_weights) else probs.gather(-1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def sigmoid_group_topk(router_logits, k: int, n_group: int, topk_group: int,
                       scaling: float = 1.0, bias=None, renormalize: bool = True):
    """Sigmoid scores in float32; ``bias`` (selection only) picks the experts: each of
    ``n_group`` groups scores the sum of its two best biased scores, the ``topk_group`` best
    groups are kept, and the top ``k`` experts inside them win. The weights are the
    unbiased scores of the winners, renormalised (k > 1) and times ``scaling``.
    Returns (weights [T, k] float32, expert ids [T, k] int64)."""
    scores = torch.sigmoid(router_logits.float())
    biased = scores if bias is None else scores + bias.float()
    tokens, experts = biased.shape
    groups = biased.view(tokens, n_group, experts // n_group)
    group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    # one-hot instead of scatter: a kept-group mask [T, G] without ScatterElements
    group_mask = (kept[..., None] == torch.arange(n_group, device=kept.device)).any(dim=1)
    expert_mask = group_mask.repeat_interleave(experts // n_group, dim=1)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    expert_ids = masked.topk(k, dim=-1).indices
    weights = scores.gather(-1, expert_ids)
    if renormalize and k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, expert_ids


class GroupLimitedGate(nn.Module):
    """LLaDA2's router: ``weight`` [E, D] and the selection bias ``expert_bias`` [E]
    (``mlp.gate.weight``, ``mlp.gate.expert_bias``), logits in float32."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int,
                 topk_group: int, scaling: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.scaling = scaling

    def forward(self, x):
        return F.linear(x.float(), self.weight.float())

    def route(self, x):
        return sigmoid_group_topk(self(x), self.top_k, self.n_group, self.topk_group,
                                  self.scaling, self.expert_bias)


def weights_as_logits(weights, expert_ids, num_experts: int):
    """Router logits whose softmax top-k gives back ``expert_ids`` with ``weights``
    renormalised: the log of the normalised weights, -1e9 elsewhere. Returns (logits,
    the weights' sum per token, to scale the fused op's output by)."""
    total = weights.sum(dim=-1, keepdim=True)  # 0 for ZAYA1's skip class: output 0
    chosen = torch.log((weights / total.clamp_min(1e-30)).clamp_min(1e-30))
    onehot = expert_ids[..., None] == torch.arange(num_experts, device=expert_ids.device)
    logits = torch.where(onehot, chosen[..., None], torch.full_like(chosen[..., None], -1e9))
    return logits.max(dim=1).values, total


class SwiGLUExpert(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def run_eager(x, experts, weights, expert_ids):
    out = torch.zeros_like(x)
    for index, expert in enumerate(experts):
        token, slot = torch.where(expert_ids == index)
        if token.numel():
            contribution = expert(x[token]) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, contribution)
    return out


def run_dense(x, experts, weights, expert_ids):
    num_experts = len(experts)
    chosen = expert_ids[..., None] == torch.arange(num_experts, device=x.device)
    gate = (chosen.to(weights.dtype) * weights[..., None]).sum(dim=1).to(x.dtype)  # [T, E]
    out = torch.zeros_like(x)
    for index, expert in enumerate(experts):
        out = out + expert(x) * gate[:, index : index + 1]
    return out


def run_sparse(x, fc1t, fc2t, weights, expert_ids, block: int, act=F.silu):
    """Group (token, expert) pairs by expert into ``block``-row blocks; one bmm per matrix.

    fc1t: [E, D, 2I] with gate/up columns interleaved; fc2t: [E, I, D].
    """
    tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    num_experts = fc1t.shape[0]
    pairs = tokens * top_k
    # Worst case: every expert's segment wastes block-1 rows of padding.
    num_blocks = math.ceil((pairs + num_experts * (block - 1)) / block)
    flat_expert = expert_ids.reshape(pairs)
    # Counting runs in float32 (exact below 2**24 pairs) because TensorRT's CumSum, Clip and
    # floor division take no int64.
    onehot = (flat_expert[:, None] == torch.arange(num_experts, device=x.device)).float()
    rank = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=1)  # position within its expert
    padded = torch.ceil(onehot.sum(dim=0) / block) * block
    seg_end = padded.cumsum(dim=0)
    slot = ((seg_end - padded)[flat_expert] + rank).long()  # unique destination row of each pair
    token_of_pair = torch.arange(pairs, device=x.device) // top_k
    # Which token fills each row: scatter the small index vector (padding rows point at an
    # appended zero row) and gather the activations, instead of scattering [rows, D] data.
    source = torch.full((num_blocks * block,), tokens, dtype=torch.long, device=x.device)
    source = source.index_put((slot,), token_of_pair)
    padded_x = torch.cat([x, x.new_zeros(1, hidden)])
    rows = padded_x[source]
    block_start = torch.arange(num_blocks, device=x.device).float() * block
    block_expert = (block_start[:, None] >= seg_end[None, :]).sum(dim=1)
    block_expert = torch.minimum(block_expert, torch.tensor(num_experts - 1, device=x.device))
    xb = rows.view(num_blocks, block, hidden)
    h = torch.bmm(xb, fc1t[block_expert])  # [nb, block, 2I]
    h = act(h[..., 0::2]) * h[..., 1::2]
    yb = torch.bmm(h, fc2t[block_expert])  # [nb, block, D]
    y = yb.reshape(num_blocks * block, hidden)[slot].view(tokens, top_k, hidden)
    return (y * weights[..., None].to(x.dtype)).sum(dim=1)


@torch.library.custom_op("dllm_export::moe_swiglu", mutates_args=())
def moe_swiglu(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor,
               fc2: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
    """Softmax top-k routing plus interleaved-SwiGLU experts in one op.

    Exported as ``com.microsoft::MoE`` (see export/onnx_moe.py); this eager body is the
    reference ONNX Runtime's kernel is checked against.
    """
    weights, expert_ids = softmax_topk(router_logits, top_k, renormalize=normalize)
    return run_sparse(x, fc1.transpose(1, 2), fc2.transpose(1, 2), weights, expert_ids,
                      DEFAULT_BLOCK)


@moe_swiglu.register_fake
def _(x, router_logits, fc1, fc2, top_k, normalize):
    return torch.empty_like(x)


class SparseMoeBlock(nn.Module):
    """Router (``gate``) plus ``experts.{j}.{gate,up,down}_proj`` (LLaDA-MoE / OLMoE names),
    optionally ``shared_experts`` (every token, added unweighted: LLaDA2). ``gate`` is a
    softmax top-k ``nn.Linear`` by default, or any module with ``route(x) -> (weights,
    ids)`` (``GroupLimitedGate``). ``routing_hooks`` see each call's expert ids (profiling
    and calibration count experts from them; nobody routes twice)."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int,
                 renormalize: bool = False, expert_bias: bool = False, gate=None,
                 shared: nn.Module | None = None, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.top_k = top_k
        self.renormalize = renormalize
        self.custom_router = gate is not None
        self.gate = gate if gate is not None else nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, inner, activation)
                                     for _ in range(num_experts))
        if shared is not None:
            self.shared_experts = shared
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None
        self.routing_hooks: list = []
        self.strategy = "eager"
        self.block = DEFAULT_BLOCK
        self.fc1t = self.fc2t = None  # packed expert weights, built by pack()

    def pack(self):
        """Stack expert weights into fc1t [E, D, 2I] (gate/up columns interleaved) and
        fc2t [E, I, D], and re-point each expert's parameters at views of them, so one copy
        is held. The transposed layout lets the sparse strategy gather blocks of weights and
        multiply without a transpose per step."""
        first = self.experts[0]
        num_experts = len(self.experts)
        inner, hidden = first.gate_proj.weight.shape
        dtype, device = first.gate_proj.weight.dtype, first.gate_proj.weight.device
        fc1t = torch.empty(num_experts, hidden, 2 * inner, dtype=dtype, device=device)
        fc2t = torch.empty(num_experts, inner, hidden, dtype=dtype, device=device)
        with torch.no_grad():
            for index, expert in enumerate(self.experts):
                fc1t[index, :, 0::2] = expert.gate_proj.weight.T
                fc1t[index, :, 1::2] = expert.up_proj.weight.T
                fc2t[index] = expert.down_proj.weight.T
                views = (fc1t[index, :, 0::2].T, fc1t[index, :, 1::2].T, fc2t[index].T)
                for linear, view in zip((expert.gate_proj, expert.up_proj, expert.down_proj), views, strict=True):
                    linear.weight = nn.Parameter(view, requires_grad=False)
        self.fc1t, self.fc2t = fc1t, fc2t

    def ort_refusal(self) -> str | None:
        """Why ``com.microsoft::MoE`` cannot compute this block (None: it can)."""
        if self.activation != "silu":
            return f"com.microsoft::MoE runs SwiGLU experts; these use {self.activation}"
        if (not self.custom_router and self.expert_bias is not None
                and bool(self.expert_bias.any())):
            return "this checkpoint has a non-zero expert_bias, which com.microsoft::MoE cannot apply"
        return None

    def set_strategy(self, strategy: str, block: int = DEFAULT_BLOCK):
        if strategy not in STRATEGIES:
            raise DllmExportError(f"--moe {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if strategy == "ort" and (reason := self.ort_refusal()):
            raise DllmExportError(f"--moe ort: {reason}; use --moe sparse or dense")
        if strategy in ("sparse", "ort") and self.fc1t is None:
            self.pack()
        self.strategy, self.block = strategy, block

    def route(self, x):
        """(weights [T, k] float32, expert ids [T, k]) of the rows of ``x`` [T, D]."""
        if self.custom_router:
            return self.gate.route(x)
        return softmax_topk(self.gate(x), self.top_k, self.renormalize, self.expert_bias)

    def _fused(self, x, routed=None):
        # com.microsoft::MoE wants nn.Linear layouts: fc1 [E, 2I, D], fc2 [E, D, I]
        fc1, fc2 = self.fc1t.transpose(1, 2), self.fc2t.transpose(1, 2)
        if not self.custom_router:  # the op's own softmax top-k is the router
            return moe_swiglu(x, self.gate(x), fc1, fc2, self.top_k, self.renormalize)
        weights, expert_ids = routed if routed is not None else self.route(x)
        logits, total = weights_as_logits(weights, expert_ids, len(self.experts))
        return moe_swiglu(x, logits, fc1, fc2, self.top_k, True) * total.to(x.dtype)

    def forward(self, x, routed=None):
        """``routed``: (weights, expert ids) of the rows when the router needs more than
        ``x`` (ZAYA1's carries a state from layer to layer) and the caller ran it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.strategy == "ort":
            out = self._fused(x, routed)
        else:
            weights, expert_ids = routed if routed is not None else self.route(x)
            for hook in self.routing_hooks:
                hook(expert_ids)
            if self.strategy == "dense":
                out = run_dense(x, self.experts, weights, expert_ids)
            elif self.strategy == "sparse":
                out = run_sparse(x, self.fc1t, self.fc2t, weights, expert_ids, self.block,
                                 ACTIVATIONS[self.activation])
            else:
                out = run_eager(x, self.experts, weights, expert_ids)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)
