"""Each family against an independent formulation in transformers, and the MoE strategies
against each other."""

from __future__ import annotations

import pytest
import torch
from references import reference_logits

from dllm_export.models import load_model, set_moe_strategy
from dllm_export.models.head import canvas_logits
from dllm_export.models.moe import softmax_topk

FAMILIES = ("llada", "llada-moe", "dream")
# float32 on the same weights: the formulations differ only in operation order.
PARITY_ATOL = 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers_reference(family, tiny_model):
    model, _ = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 370, (2, 24), generator=generator)
    with torch.no_grad():
        ours = canvas_logits(model, ids)
    ref = reference_logits(family, model, ids)
    assert ours.shape == ref.shape == (2, 24, model.args.vocab_size)
    assert (ours - ref).abs().max().item() < PARITY_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_reference_and_hides_pads(family, tiny_model):
    model, _ = tiny_model(family)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 370, (2, 20), generator=generator)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        ours = canvas_logits(model, ids, mask)
        changed = ids.clone()
        changed[1, :6] = 7  # different pad contents must not change real positions
        ours_changed = canvas_logits(model, changed, mask)
    ref = reference_logits(family, model, ids, mask)
    assert (ours[:, 6:] - ref[:, 6:]).abs().max().item() < PARITY_ATOL
    # Dream reads position p from row p-1, so its first real position sees the last pad row
    # (a prompt position, never predicted during generation).
    first = 7 if family == "dream" else 6
    assert (ours[1, first:] - ours_changed[1, first:]).abs().max().item() < 1e-5


def test_attention_is_bidirectional(tiny_model):
    model, _ = tiny_model("llada")
    ids = torch.randint(0, 370, (1, 16))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 370
    with torch.no_grad():
        assert (model(ids)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-4


def test_dream_logits_are_shifted(tiny_model):
    """Row p holds the prediction read from output row p-1 (row 0 for p = 0)."""
    from references import _mask4d, dream_reference

    model, _ = tiny_model("dream")
    ids = torch.randint(0, 370, (1, 12))
    with torch.no_grad():
        ours = canvas_logits(model, ids)
        raw = dream_reference(model)(input_ids=ids, attention_mask=_mask4d(None, 1, 12)).logits
    assert (ours[:, 0] - raw[:, 0]).abs().max() < PARITY_ATOL
    assert (ours[:, 1:] - raw[:, :-1]).abs().max() < PARITY_ATOL


@pytest.mark.parametrize("strategy", ["dense", "sparse", "ort"])
@pytest.mark.parametrize("block", [1, 4, 16])
def test_moe_strategies_agree_with_reference_loop(strategy, block, tiny_dir):
    model, _ = load_model(tiny_dir("llada-moe"))
    ids = torch.randint(0, 370, (2, 33))
    with torch.no_grad():
        expected = model(ids)
        set_moe_strategy(model, strategy, block)
        got = model(ids)
    assert (got - expected).abs().max().item() < 1e-5


def test_softmax_topk_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    weights, ids = softmax_topk(logits, 2)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights, probs[:, :2])  # LLaDA-MoE: no renormalisation
    renorm, _ = softmax_topk(logits, 2, renormalize=True)
    assert torch.allclose(renorm.sum(-1), torch.ones(1))
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    _, biased_ids = softmax_topk(logits, 2, bias=bias)
    assert biased_ids.tolist() == [[2, 0]]
    selection_only, _ = softmax_topk(logits, 2, bias=bias, bias_in_weights=False)
    assert torch.allclose(selection_only, probs[:, [2, 0]])


def test_moe_weights_are_held_once(tiny_dir):
    """Packing re-points expert parameters at views of the packed tensors."""
    model, _ = load_model(tiny_dir("llada-moe"))
    set_moe_strategy(model, "sparse")
    block = model.moe_blocks()[0]
    gate = block.experts[3].gate_proj.weight
    assert gate.untyped_storage().data_ptr() == block.fc1t.untyped_storage().data_ptr()
