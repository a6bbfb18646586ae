"""Export: every family to a validated artifact, run on ONNX Runtime without torch, token
for token equal to the PyTorch checkpoint at temperature 0."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ARTIFACT_SEQ_LEN as SEQ_LEN

from dllm_export import DllmExportError
from dllm_export.cli import main
from dllm_export.export import onnx as onnx_export
from dllm_export.export.onnx import ExportOptions, export_model
from dllm_export.runtime import Generator, SamplerConfig, denoise
from dllm_export.runtime.backends.onnxruntime import OrtBackend

GEN = 16


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_export_is_valid_and_only_fused_attention_needs_onnx_runtime(family, artifact):
    directory = artifact(family)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["valid"] is True
    for row in manifest["validation"]["results"]:
        assert row["failed"] == [] and row["top1_agreement_ties"] >= 0.999, row
        assert row["logprob_diff"] < 1e-4, row  # float32 rounding
    assert [r["case"] for r in manifest["validation"]["results"]] == [
        "mask_0.1", "mask_0.5", "mask_0.9", "left_padded", "rows/first", "rows/block",
        "rows/last", "prefill/bidirectional",
        "window/bidirectional", "prefill/block_causal", "step/block_causal",
        "commit/block_causal", "step-after-commit/block_causal", "prefill/causal",
        "decode/causal"]
    # --target onnxruntime: attention and RoPE run as ONNX Runtime's contrib ops, the only
    # nodes TensorRT cannot parse (--target tensorrt exports: tests/test_attention_export.py)
    trt = manifest["trt_compatibility"]
    assert {f["op"] for f in trt["findings"]} == {"com.microsoft::MultiHeadAttention",
                                                  "com.microsoft::RotaryEmbedding"}
    assert trt["graphs"] == dict.fromkeys(
        ["canvas", "prefill", "step", "window", "decode", "rows"], False)
    assert manifest["shift_logits"] is (family == "dream")
    assert (manifest["moe"] is not None) is (family == "llada-moe")
    assert manifest["shapes"] == {"batch": 1, "seq_len": SEQ_LEN}
    assert sorted(p.name for p in directory.iterdir()) == [
        ".dllm-export", "decode.onnx", "generation_config.json", "manifest.json", "model.onnx",
        "model.onnx.data", "model_logits.onnx", "prefill.onnx", "rows.onnx",
        "special_tokens_map.json",
        "step.onnx", "tokenizer.json", "tokenizer_config.json", "window.onnx"]


def test_graph_names_follow_checkpoint_modules(artifact):
    import onnx

    model = onnx.load(str(artifact("llada-moe") / "model.onnx"), load_external_data=False)
    names = {n.name for n in model.graph.node}
    assert "model.layers.0.mlp.gate/Gemm" in names or "model.layers.0.mlp.gate/MatMul" in names
    weights = {i.name for i in model.graph.initializer}
    assert "model.layers.1.self_attn.q_proj.weight_t" in weights
    assert not any(p.key.startswith("pkg.torch") for n in model.graph.node for p in n.metadata_props)


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_artifact_commits_the_same_tokens_as_pytorch(family, artifact, tiny_dir):
    """Temperature 0, fp32, same canvas: the ORT artifact and the checkpoint agree exactly."""
    torch_gen = Generator.from_checkpoint(tiny_dir(family))
    manifest = json.loads((artifact(family) / "manifest.json").read_text())
    ort_backend = OrtBackend(artifact(family), manifest)
    prompt = list(np.random.default_rng(3).integers(0, 300, SEQ_LEN - GEN))
    configs = [SamplerConfig(gen_length=GEN, steps=GEN, block_length=8, early_exit=False),
               SamplerConfig(gen_length=GEN, steps=8, block_length=GEN, threshold=0.2,
                             early_exit=False),
               SamplerConfig(algorithm="dream", gen_length=GEN, steps=8, alg="topk_margin",
                             early_exit=False)]
    for config in configs:
        expected = denoise(torch_gen.backend, [prompt], config, torch_gen.special).sequences
        got = denoise(ort_backend, [prompt], config, torch_gen.special).sequences
        assert got.tolist() == expected.tolist(), config


def test_moe_strategies_export_and_agree(artifact):
    dense = json.loads((artifact("llada-moe", "dense") / "manifest.json").read_text())
    ort = json.loads((artifact("llada-moe", "ort") / "manifest.json").read_text())
    assert dense["valid"] and ort["valid"]
    # --target onnxruntime's attention and RoPE
    fused = {"com.microsoft::MultiHeadAttention", "com.microsoft::RotaryEmbedding"}
    assert {f["op"] for f in dense["trt_compatibility"]["findings"]} == fused
    # com.microsoft::MoE needs a plugin as well
    assert {f["op"] for f in ort["trt_compatibility"]["findings"]} == {"com.microsoft::MoE",
                                                                       *fused}


def test_runtime_generates_without_torch(artifact, tmp_path):
    """A subprocess in which importing torch fails runs generation from the artifact."""
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from dllm_export.runtime import Generator
        gen = Generator.from_artifact({str(artifact('llada-moe'))!r})
        out = gen.generate("hello", gen_length=8, steps=8, block_length=8)
        assert "torch" not in sys.modules
        print("generated", out.forwards, len(out.tokens[0]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("generated 8 ")


def test_prompt_longer_than_the_artifact(artifact):
    gen = Generator.from_artifact(artifact("llada"))
    long_prompt = " ".join(["the quick brown fox"] * 40)
    with pytest.raises(DllmExportError, match=rf"prompt has \d+ tokens but the engine fits "
                                              rf"{SEQ_LEN - GEN} \(seq-len {SEQ_LEN} - gen-length {GEN}\)"):
        gen.generate(long_prompt, gen_length=GEN, steps=GEN, block_length=GEN)
    out = gen.generate(long_prompt, gen_length=GEN, steps=GEN, block_length=GEN, truncate=True)
    assert out.forwards == GEN


def test_failed_validation_marks_the_artifact_invalid(tiny_dir, tmp_path, monkeypatch):
    from dllm_export.export import validate

    monkeypatch.setitem(validate.BARS, "fp32", {"top1_agreement": 0.5,
                                                "logprob_tolerance": 1e-12, "percentile": 100})
    out = tmp_path / "invalid"
    # the message names the first failing case and its check (which cases miss a 1e-12 bar
    # depends on the CPU's kernels: some machines compute mask_0.1 exactly)
    with pytest.raises(DllmExportError, match=r"validation against PyTorch failed \("
                                              r"(mask_0\.\d|left_padded): max log-probability "
                                              r"difference .* > 1e-12"):
        export_model(tiny_dir("llada"), out, ExportOptions(seq_len=32))
    assert json.loads((out / "manifest.json").read_text())["valid"] is False
    with pytest.raises(DllmExportError, match=r"manifest.json.*not valid|marked invalid|valid"):
        Generator.from_artifact(out)


def test_a_correct_near_uniform_export_passes(tmp_path):
    """The reliability issue's case: make-tiny llada seed 1 at --seq-len 64 failed the old
    mean-cosine bar (0.99859 at a 4.8e-7 difference) and blamed the wrong case; a correct
    export must pass every check, and its differences stay at float32 rounding."""
    from dllm_export.models.tiny import make_tiny

    checkpoint = make_tiny("llada", tmp_path / "seed1", seed=1)
    manifest = export_model(checkpoint, tmp_path / "art", ExportOptions(seq_len=64))
    assert manifest["valid"] is True
    assert max(r["logprob_diff"] for r in manifest["validation"]["results"]) < 1e-5


def test_interrupted_export_leaves_no_directory(tiny_dir, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dllm_export.export.trt_lint.check_trt", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_dir("llada"), tmp_path / "art", ExportOptions(seq_len=32))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_options(tiny_dir, tmp_path):
    with pytest.raises(DllmExportError, match=r"--seq-len 9000 exceeds the model's 4096 positions"):
        export_model(tiny_dir("llada"), tmp_path / "a", ExportOptions(seq_len=9000))
    with pytest.raises(DllmExportError, match=r"eager has data-dependent shapes"):
        ExportOptions(moe="eager")
    (tmp_path / "exists").mkdir()
    with pytest.raises(DllmExportError, match=r"already exists; choose another path or pass --overwrite"):
        export_model(tiny_dir("llada"), tmp_path / "exists", ExportOptions(seq_len=32))


def test_validate_reruns_against_the_checkpoint(artifact):
    manifest = onnx_export.validate_artifact(artifact("dream"))
    assert manifest["valid"] and len(manifest["validation"]["results"]) == 15


def test_cli_run_and_one_line_errors(artifact, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(artifact("llada")), "--prompt", "hi",
                                  "--gen-length", "16", "--steps", "8", "--block-length", "8"])
    assert result.exit_code == 0, result.output
    assert "forwards=8" in result.output
    result = runner.invoke(main, ["run", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "error:" in result.output


def test_the_export_summary_says_which_moe_form_it_picked(capsys):
    """``export`` prints the MoE form ``--moe auto`` chose for the target, per graph."""
    from dllm_export.cli import _print_export_summary

    manifest = {"validation": {}, "trt_compatibility": {"clean": True, "findings": []},
                "valid": True,
                "moe": {"strategy": "dense", "requested": "auto", "target": "onnxruntime",
                        "experts": 8, "top_k": 1,
                        "graphs": {"canvas": {"form": "dense"}, "draft": {"form": "sparse"}}}}
    _print_export_summary("out/x", manifest)
    assert ("MoE: 8 experts top-1, --moe auto for onnxruntime -> dense (canvas dense, draft "
            "sparse)") in " ".join(capsys.readouterr().out.split())


def test_moe_auto_takes_the_fused_op_on_onnx_runtime_unless_the_blocks_refuse_it(tmp_path,
                                                                                  capsys):
    """--moe auto for ONNX Runtime exports com.microsoft::MoE even with few experts; a
    LLaDA-MoE checkpoint with a non-zero expert_bias (which the op cannot apply) falls back
    to the dense form, and the manifest and the export summary say why."""
    import onnx
    from safetensors.numpy import load_file, save_file

    from dllm_export.cli import _print_export_summary
    from dllm_export.models.tiny import make_tiny

    checkpoint = make_tiny("llada-moe", tmp_path / "ckpt", dtype="float32", seed=2,
                           overrides={"moe_router_enable_expert_bias": True})
    options = ExportOptions(seq_len=32, validate=False)
    plain = export_model(checkpoint, tmp_path / "plain", options)
    assert plain["moe"]["strategy"] == "ort" and "ort_refusal" not in plain["moe"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "plain" / "model.onnx"),
                                        load_external_data=False).graph.node}
    assert "MoE" in ops
    for shard in checkpoint.glob("*.safetensors"):  # a bias the op cannot apply
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith("expert_bias")]:
            tensors[name] = np.linspace(-0.1, 0.1, tensors[name].size, dtype=np.float32)
        save_file(tensors, shard, metadata={"format": "pt"})
    biased = export_model(checkpoint, tmp_path / "biased", options)
    assert biased["moe"]["strategy"] == "dense"
    assert "non-zero expert_bias" in biased["moe"]["ort_refusal"]
    capsys.readouterr()
    _print_export_summary("out/x", biased)
    assert "-> dense (canvas dense); not ort: this checkpoint has a non-zero expert_bias" in (
        " ".join(capsys.readouterr().out.split()))
    with pytest.raises(DllmExportError, match="--moe ort: this checkpoint has a non-zero"):
        export_model(checkpoint, tmp_path / "asked", dataclasses.replace(options, moe="ort"))
    trt = export_model(checkpoint, tmp_path / "trt", dataclasses.replace(options,
                                                                       target="tensorrt"))
    assert trt["moe"]["strategy"] == "dense" and "ort_refusal" not in trt["moe"]
