"""The roofline and the memory planner against hand-computed cases, and ``plan`` on the real
8B configs (config.json only, no weights)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dllm_export import roofline
from dllm_export.cli import main
from dllm_export.device_profiles import BuildSettings, DeviceProfile, load_profile
from dllm_export.errors import DllmExportError
from dllm_export.export.plan import (
    Workload,
    activation_peak,
    estimate,
    longest_fitting_seq_len,
    moe_rows,
    plan_model,
    resolve_precision,
)
from dllm_export.model_shape import model_shape

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "llada-8b-instruct").is_dir(),
                                     reason="../shared/reference is not present")

# A one-layer LLaDA small enough to count by hand: hidden 8, 2 heads of 4, MLP 16, vocab 10.
TINY_LLADA = {"model_type": "llada", "d_model": 8, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1,
              "mlp_hidden_size": 16, "vocab_size": 10, "embedding_size": 10,
              "weight_tying": False}
# The same attention with 4 experts of width 4, top-2, no shared expert, no q/k norm.
TINY_MOE = {"model_type": "llada", "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 2, "num_hidden_layers": 1, "num_experts": 4,
            "num_experts_per_tok": 2, "expert_intermediate_size": 4, "vocab_size": 10,
            "qk_layernorm": False, "tie_word_embeddings": False}


def fake_profile(**changes) -> DeviceProfile:
    """1 TFLOPS at every precision and 1 GB/s: times are FLOPs x 1e-12 and bytes x 1e-9."""
    values = dict(
        name="fake", description="hand-computed", engine_library="tensorrt",
        compute_capability=(9, 0), memory_gib=1.0, unified_memory=False, usable_fraction=1.0,
        bandwidth_gbs=1.0, peak_tflops={"fp32": 1.0, "fp16": 1.0, "int8": 1.0},
        precisions=("fp32", "fp16", "int8", "int4"), dla_cores=0,
        build=BuildSettings(workspace_gib=0.0, optimization_level=3, seq_len=4, batch=1,
                            precision="fp16"),
        sources={}, path=Path("fake.yaml"))
    values.update(changes)
    return DeviceProfile(**values)


def test_parameters_by_hand():
    shape = model_shape(TINY_LLADA)
    # matrices: attention 8*(2*8 + 2*8) = 256, MLP 3*8*16 = 384
    assert shape.matrix_parameters() == 256 + 384
    # kept: embedding 10*8 + LM head 10*8, norms 2*8 per layer + final 8
    assert shape.kept_parameters() == 80 + 80 + 16 + 8
    moe = model_shape(TINY_MOE)
    # attention 256 + 4 experts x 3*8*4; kept adds the router 8*4
    assert moe.matrix_parameters() == 256 + 4 * 96
    assert moe.kept_parameters() == 160 + 32 + 24


def test_weight_bytes_by_hand():
    shape = model_shape(TINY_LLADA)
    assert roofline.weight_bytes(shape, "fp32") == 824 * 4
    assert roofline.weight_bytes(shape, "fp16") == 824 * 2
    assert roofline.weight_bytes(shape, "int8") == 640 * 1 + 184 * 2
    # int4: half a byte plus an fp16 scale per 128 weights = 0.515625 byte per weight
    assert roofline.weight_bytes(shape, "int4") == 640 * 0.515625 + 184 * 2


def test_forward_flops_by_hand():
    shape = model_shape(TINY_LLADA)
    # 4 tokens x 2 FLOP x (attention 256 + MLP 384 + head 80 parameters) = 5760
    assert roofline.matrix_flops(shape, 4) == 5760
    # QK^T and PV: 4 x batch 1 x 2 heads x 4 x 4 positions x head_dim 4 = 512
    assert roofline.attention_flops(shape, 1, 4, 4) == 512
    assert roofline.forward_flops(shape, 1, 4) == 6272
    moe = model_shape(TINY_MOE)
    # per token: attention 256 + router 32 + 2 experts x 96 + head 80 = 560 -> 2*4*560
    assert roofline.forward_flops(moe, 1, 4) == 2 * 4 * 560 + 512
    # the rows graph: the LM head (80 parameters) on 1 of the 4 tokens
    assert roofline.matrix_flops(shape, 4, head_tokens=1) == 5760 - 2 * 3 * 80


def test_expected_experts_hit():
    assert roofline.expected_experts_hit(4, 2, 1) == 2  # one token: its own top-k
    assert roofline.expected_experts_hit(4, 2, 4) == 4 * (1 - 0.5 ** 4)  # 3.75
    # a full canvas reaches every expert: 256 tokens, top-8 of 64
    assert roofline.expected_experts_hit(64, 8, 256) == pytest.approx(64, abs=1e-6)
    assert roofline.expected_experts_hit(0, 0, 10) == 0


def test_bytes_read_by_hand():
    shape = model_shape(TINY_LLADA)
    # fp16: matrices 640*2; kept without the embedding table (104) + 4 gathered rows of 8
    assert roofline.bytes_read(shape, "fp16", 4) == 640 * 2 + (104 + 32) * 2
    moe = model_shape(TINY_MOE)
    # attention 256 + 3.75 experts hit x 96; kept 216 - table 80 + 32 gathered
    assert roofline.bytes_read(moe, "fp16", 4) == (256 + 3.75 * 96) * 2 + (216 - 80 + 32) * 2


def test_step_floor_and_bound():
    shape, device = model_shape(TINY_LLADA), fake_profile()
    step = roofline.denoiser_step(shape, device, "fp16", 1, 4)
    assert step.compute_seconds == pytest.approx(6272e-12)
    assert step.memory_seconds == pytest.approx(1552e-9)
    assert step.floor_seconds == step.memory_seconds and step.bound == "memory"
    fast_memory = fake_profile(bandwidth_gbs=1e6)
    assert roofline.denoiser_step(shape, fast_memory, "fp16", 1, 4).bound == "compute"


def test_autoregressive_token_by_hand():
    shape = model_shape(TINY_LLADA)
    token = roofline.autoregressive_token(shape, fake_profile(), "fp16", 1, 4)
    # one token: 2 x 720 + attention over 4 cached keys and its own, 4 x 2 heads x 5 x
    # head_dim 4 (the same call_cost as a cached block step of one row)
    assert token.flops == 1440 + 160
    assert token.flops == roofline.cached_step(shape, fake_profile(), "fp16", 1, 1, 4).flops
    # weights for one token (1280 + (104 + 8) * 2) + K and V cache 2 x 1 layer x 4 x 8 x 2
    assert token.bytes == 1280 + 224 + 128


def test_cached_step_and_generation_floor_by_hand():
    shape, device = model_shape(TINY_LLADA), fake_profile()
    step = roofline.cached_step(shape, device, "fp16", 1, 2, 4)
    # 2 rows: 2 x 2 x 720 matrices + attention of 2 rows over 4 cached + 2 own keys
    assert step.flops == 2880 + 4 * 2 * 2 * 6 * 4
    full = roofline.denoiser_step(shape, device, "fp16", 1, 6)
    # dual: 2 blocks of 2 -> 2 full forwards, 4 cached ones; block: 1 prefill, 5 cached
    dual = roofline.generation_floor(shape, device, "fp16", "dual", 6, 2, 6, 2)
    assert dual["floor_seconds"] == pytest.approx(
        2 * full.floor_seconds + 4 * roofline.cached_step(shape, device, "fp16", 1, 2, 6)
        .floor_seconds)
    block = roofline.generation_floor(shape, device, "fp16", "block", 6, 2, 6, 2)
    assert (block["full_forwards"], block["cached_forwards"]) == (1, 5)
    none = roofline.generation_floor(shape, device, "fp16", "none", 6, 2, 6, 2)
    assert none["floor_seconds"] == pytest.approx(6 * full.floor_seconds)
    rows = roofline.generation_floor(shape, device, "fp16", "none", 6, 2, 6, 2, head_rows=2)
    head = roofline.denoiser_step(shape, device, "fp16", 1, 6, head_rows=2)
    assert head.flops == full.flops - 2 * 4 * 80  # 4 rows fewer through the LM head
    assert rows["floor_seconds"] == pytest.approx(6 * head.floor_seconds)


def test_activation_peak_by_hand():
    work = Workload(model_shape(TINY_LLADA), batch=1, seq_len=4)
    # fp16, 4 tokens: residual + normed copy 2*4*8*2 = 128
    # attention: 128 + QKVO 4*(16+16)*2 = 256 + scores and probs 2*1*2*4*4*2 = 128 -> 512
    # MLP: 128 + gate, up, product 3*4*16*2 = 384 -> 512
    # head: hidden 4*8*2 + fp32 logits and log-probs 2*4*10*4 -> 384
    # I/O: ids and mask 2*4*8 = 64 + outputs 4*(8*12 + 4 + 2*4) = 432
    assert activation_peak(work, "fp16") == 512 + 64 + 432
    logits = Workload(model_shape(TINY_LLADA), 1, 4, outputs="logits")
    assert activation_peak(logits, "fp16") == 512 + 64 + 4 * 10 * 4


def test_moe_rows_and_sparse_gather_by_hand():
    shape = model_shape(TINY_MOE)
    sparse = Workload(shape, 1, 4, moe_strategy="sparse", moe_block=16)
    # 8 token-expert pairs + 4 experts x 15 rows of padding -> ceil(68/16) = 5 blocks
    assert moe_rows(4, sparse) == 80
    assert moe_rows(4, Workload(shape, 1, 4, moe_strategy="dense")) == 4
    assert moe_rows(4, Workload(shape, 1, 4, moe_strategy="ort")) == 8
    # MoE phase: 128 + 80 rows x (8 + 3*4) x 2 + 5 gathered experts x 96 x 2 = 4288 (the peak)
    assert activation_peak(sparse, "fp16") == 4288 + 64 + 432


def test_fit_by_hand():
    work = Workload(model_shape(TINY_LLADA), 1, 4)
    # fp16 weights 1648 + activations 1008 + no workspace, against 2000 usable bytes
    memory = estimate(work, "fp16", fake_profile(memory_gib=2000 / (1 << 30)))
    assert memory.total_bytes == 1648 + 1008 and memory.fits is False
    assert estimate(work, "int4", fake_profile(memory_gib=2000 / (1 << 30))).fits


@needs_reference
def test_the_longest_sequence_that_fits_is_the_boundary():
    long = Workload(model_shape(load_reference("llada-8b-instruct")), 1, 1 << 16)
    h100 = load_profile("h100-sxm")
    best = longest_fitting_seq_len(long, "fp16", h100)
    assert best and best % 32 == 0
    assert estimate(long.at(best), "fp16", h100).fits
    assert not estimate(long.at(best + 32), "fp16", h100).fits


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE / name / "config.json").read_text())


@needs_reference
def test_model_shape_matches_the_families_parameter_counts():
    torch = pytest.importorskip("torch")  # noqa: F841  (models/ import torch)
    from dllm_export.models import family_module

    configs = [load_reference("llada-8b-instruct"), load_reference("llada-8b-base")]
    for family in ("llada", "llada-moe", "dream"):
        configs.append(family_module(family).tiny_config(300, {"mask": 299, "eos": 298}))
    for config in configs:
        shape = model_shape(config)
        module = family_module(shape.family)
        expected = module.parameter_counts(module.ModelArgs.from_dict(config))["total"]
        assert shape.total_parameters() == expected


@needs_reference
def test_llada_8b_does_not_fit_orin_nano_in_fp16_but_int4_does():
    plan = plan_model(REFERENCE / "llada-8b-instruct", load_profile("jetson-orin-nano-8gb"))
    assert plan.chosen.precision == "fp16" and not plan.fits
    # 32 layers x (attention 4096*4*4096 + MLP 3*4096*12288) quantisable parameters
    matrices = 32 * (4096 * 4 * 4096 + 3 * 4096 * 12288)
    kept = 2 * 126464 * 4096 + 32 * 2 * 4096 + 4096  # embedding, LM head, norms
    assert plan.chosen.weight_bytes == 2 * (matrices + kept)
    rows = {row.precision: row for row in plan.rows}
    assert rows["int4"].weight_bytes == int(matrices * 0.515625 + kept * 2)
    assert rows["int4"].fits and not rows["int8"].fits
    assert any(line.startswith("int4 fits") for line in plan.suggestions)
    assert any("no sequence length fits fp16" in line for line in plan.suggestions)


@needs_reference
def test_llada_8b_fits_bigger_devices():
    assert plan_model(REFERENCE / "llada-8b-base", load_profile("jetson-agx-orin-64gb")).fits
    h100 = plan_model(REFERENCE / "llada-8b-base", load_profile("h100-sxm"), seq_len=1024)
    assert h100.fits and h100.chosen.precision == "bf16"
    roof = h100.as_dict()["roofline"]
    assert roof["denoiser_step"]["bound"] in ("compute", "memory")
    assert roof["autoregressive_tokens_per_step"] > 1


@needs_reference
def test_cli_plan_for_the_real_config(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(REFERENCE / "llada-8b-instruct"),
                                  "--profile", "jetson-orin-nano-8gb", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fits"] is False and data["precision"] == "fp16"
    assert {r["precision"]: r["fits"] for r in data["by_precision"]}["int4"] is True
    table = runner.invoke(main, ["plan", str(REFERENCE / "llada-8b-instruct"),
                                 "--profile", "jetson-orin-nano-8gb"])
    assert table.exit_code == 0 and "does NOT fit" in table.output
    refused = runner.invoke(main, ["plan", str(REFERENCE / "llada-8b-instruct"),
                                   "--profile", "jetson-orin-nano-8gb", "--precision", "fp8"])
    assert refused.exit_code == 1 and "fp8 needs compute capability 8.9" in refused.output


def test_unsupported_family_is_said_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_dllm"}))
    with pytest.raises(DllmExportError,
                       match="model_type 'not_a_dllm' is not a supported family"):
        plan_model(tmp_path, load_profile("h100-sxm"))


def write_artifact(directory: Path, config: dict, precision="int4", seq_len=128) -> Path:
    directory.mkdir(parents=True)
    manifest = {"format": "dllm-export", "kind": "onnx", "family": "llada",
                "source": {"config": config}, "shapes": {"batch": 1, "seq_len": seq_len},
                "dtype": "fp32", "precision": precision, "topk": 8, "special_ids": [1, 2],
                "outputs": "decode", "moe": None, "graph": {"file": "model.onnx"},
                "inputs": [{"name": "input_ids", "shape": [1, seq_len]},
                           {"name": "attention_mask", "shape": [1, seq_len]}],
                "valid": True}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "model.onnx").write_bytes(b"not a real graph")
    return directory


def test_plan_reads_an_artifact_and_keeps_its_shapes(tmp_path):
    artifact = write_artifact(tmp_path / "art", TINY_LLADA, precision="int4", seq_len=128)
    plan = plan_model(artifact, load_profile("jetson-orin-nano-8gb"))
    assert (plan.work.seq_len, plan.chosen.precision, plan.source.kind) == (128, "int4", "artifact")
    with pytest.raises(DllmExportError, match="--seq-len 256: the artifact .* has fixed shapes"):
        plan_model(artifact, load_profile("jetson-orin-nano-8gb"), seq_len=256)
    with pytest.raises(DllmExportError, match="already int4; its precision is fixed"):
        plan_model(artifact, load_profile("jetson-orin-nano-8gb"), precision="fp16")


def test_resolve_precision_rules():
    orin, h100 = load_profile("jetson-orin-nano-8gb"), load_profile("h100-sxm")
    assert resolve_precision("fp32", None, orin) == "fp16"  # the profile's build precision
    assert resolve_precision("fp32", None, h100) == "bf16"
    assert resolve_precision("fp32", "fp32", h100) == "fp32"
    assert resolve_precision("fp8", None, h100) == "fp8"
    with pytest.raises(DllmExportError, match="quantise it first"):
        resolve_precision("fp32", "int8", h100)
    with pytest.raises(DllmExportError, match="fp8 needs compute capability 8.9"):
        resolve_precision("fp8", None, orin)
    assert resolve_precision(None, "int4", orin) == "int4"  # from a config: anything it runs


def test_moe_auto_picks_the_form_per_target():
    from dllm_export.export.onnx import DENSE_EXPERTS, DENSE_ROWS, resolve_moe

    # ONNX Runtime: the fused op at any expert count, unless the blocks refuse it; TensorRT
    # (and a refused op): dense for few experts; for many the parser-clean sparse form,
    # except in graphs of up to DENSE_ROWS rows, where dense is memory-bound; an explicit
    # --moe is never second-guessed
    assert resolve_moe("auto", DENSE_EXPERTS, "tensorrt", 4096) == "dense"
    assert resolve_moe("auto", 8, "onnxruntime", 4096) == "ort"
    assert resolve_moe("auto", 64, "onnxruntime", 1) == "ort"
    assert resolve_moe("auto", 8, "onnxruntime", 4096, fused=False) == "dense"
    assert resolve_moe("auto", 64, "onnxruntime", DENSE_ROWS + 1, fused=False) == "sparse"
    assert resolve_moe("auto", 256, "tensorrt", DENSE_ROWS + 1) == "sparse"
    assert resolve_moe("auto", 256, "tensorrt", DENSE_ROWS) == "dense"
    assert resolve_moe("auto", 256, "tensorrt") == "sparse"
    assert resolve_moe("dense", 256, "onnxruntime", 4096) == "dense"
    shape = dataclasses.replace(model_shape(TINY_MOE), experts=64)
    assert Workload(shape, 1, 256).strategy == "sparse"  # plan's default: a TensorRT device
    assert Workload(shape, 1, 32).strategy == "dense"
    assert Workload(shape, 1, 256, target="onnxruntime").strategy == "ort"
