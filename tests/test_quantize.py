"""quantize: every precision from tiny checkpoints of each family, runnable artifacts, the
quality gate, TensorRT-clean Q/DQ graphs and the one-line refusals.

Tiny checkpoints have random weights, so their next-token distributions are nearly flat and
near-tied tokens flip under any rounding: these tests pass gate bars suited to that
(``RANDOM_BARS``), and the default bars are measured on the trained default model
(docs/quantization.md). Canvases are 128 tokens: the gate's held-out task prompts take up
to 80 with the tiny tokenizers and chat templates (Dream's is the longest).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dllm_export import DllmExportError
from dllm_export.calibration import modelopt_backend
from dllm_export.calibration.quantize import QuantizeOptions, quantize_artifact
from dllm_export.cli import main
from dllm_export.export.onnx import ExportOptions, export_model
from dllm_export.export.trt_lint import check_trt
from dllm_export.models.tiny import make_tiny
from dllm_export.runtime import Generator
from dllm_export.runtime.backends.onnxruntime import OrtBackend

pytest.importorskip(
    "dllm_export.eval.harness", reason="the quality harness (dllm_export/eval)"
)

SEQ_LEN = 128
FAMILIES = ("llada", "llada-moe", "dream", "llada2")
# Random weights: masked top-1 agreement of a sound INT8 run is 0.9-1.0 at every ratio there,
# while INT4's worst ratio (few positions at ratio 0.1 with 4 problems per task) went as low
# as 0.25; temperature-0 generations diverge after the first flipped tie.
RANDOM_BARS = {
    "int8": {"min_agreement": 0.6, "min_generation_agreement": 0.3},
    "fp8": {"min_agreement": 0.7, "min_generation_agreement": 0.3},
    "int4": {
        "min_agreement": 0.2,
        "min_generation_agreement": 0.1,
        "max_elbo_increase": 0.5,
    },
}
FAST = dict(samples=16, gate_samples=4, gate_mc_num=4, overwrite=True)


def fast(precision: str, **fields) -> QuantizeOptions:
    return QuantizeOptions(
        precision=precision, **{**FAST, "bars": RANDOM_BARS[precision], **fields}
    )


@pytest.fixture(scope="session")
def float_artifact(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-float")
    made = {}

    def get(family, moe="dense", seed=None):
        """seed None: the session's shared tiny checkpoint (seed 1); else a fresh one."""
        key = (family, moe, seed)
        if key not in made:
            made[key] = root / f"{family}-{moe}-{seed}"
            checkpoint = tiny_dir(family)
            if seed is not None:
                checkpoint = make_tiny(
                    family, root / f"ckpt-{family}-{seed}", seed=seed
                )
            export_model(checkpoint, made[key], ExportOptions(
                seq_len=SEQ_LEN, moe=moe, target="tensorrt"))  # Q/DQ: TensorRT-clean
        return made[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_and_int4_artifacts_run_and_generate(
    family, precision, float_artifact, tmp_path
):
    out = tmp_path / f"{family}-{precision}"
    manifest = quantize_artifact(float_artifact(family), out, fast(precision))
    assert manifest["valid"] is True and manifest["precision"] == precision
    quant = manifest["quantization"]
    assert quant["method"] == ("minmax" if precision == "int8" else "nbits")
    assert quant["quantized_nodes"] > 0
    assert "decode head" in quant["excluded"].values()
    assert "cpu" in quant["runs_on"]
    assert manifest["quality_gate"]["passed"] is True
    assert (out / "model_logits.onnx").is_file() and (out / "tokenizer.json").is_file()
    float_bytes = (float_artifact(family) / "model.onnx.data").stat().st_size
    assert (out / "model.onnx.data").stat().st_size < 0.6 * float_bytes
    kernels = quant["kernels"]
    if precision == "int8":  # every quantised linear layer runs in integers on ORT CPU
        assert kernels["canvas"]["integer"] == quant["quantized_nodes"], kernels["canvas"]
        for name, count in (quant["cached_graphs"] or {}).items():
            assert kernels[name]["integer"] == count, (name, kernels[name])
    else:  # MatMulNBits: weight-only blocks, at ONNX Runtime's default accuracy level
        assert kernels["canvas"]["weight_only"] == quant["quantized_nodes"]
        assert quant["backend_report"]["accuracy_level"] == 4
    if precision == "int8":  # Q/DQ: the TensorRT-bound format
        assert manifest["trt_compatibility"]["clean"] is True
        assert not [f for f in check_trt(out / "model.onnx") if f.severity == "error"]
        assert "jetson-orin-nano-8gb" in quant["runs_on"]
    else:
        assert sorted(quant["runs_on"]) == ["cpu", "cpu-vnni"]  # MatMulNBits: ONNX Runtime only
    if family == "llada2":  # block-causal: the cached graphs come without --cache
        assert set(manifest["cache"]["graphs"]) == {"prefill", "step", "window", "decode"}
    if family in ("llada-moe", "llada2"):
        experts = quant["calibration"]["experts"] if quant["calibration"] else None
        assert precision == "int4" or experts["uncalibrated"] == []
        assert "router" in quant["excluded"].values()
    out_text = Generator.from_artifact(out).generate(
        "Sort: 3 1 2", chat=True, gen_length=8, steps=8, block_length=8
    )
    assert len(out_text.tokens[0]) <= 8 and out_text.forwards >= 1


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])  # not block-causal
@pytest.mark.parametrize("method", ["modelopt-max", "awq_clip"])
def test_modelopt_fp8_and_int4_when_available(method, family, float_artifact, tmp_path):
    reason = modelopt_backend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    precision = "fp8" if method == "modelopt-max" else "int4"
    manifest = quantize_artifact(
        float_artifact(family),
        tmp_path / "out",
        fast(precision, method=method),
    )
    assert manifest["valid"] is True
    assert manifest["trt_compatibility"]["clean"] is True
    if precision == "fp8":
        assert "fake-quantised" in manifest["quality_gate"]["evaluation"]
        assert "cpu" not in manifest["quantization"]["runs_on"]
        assert "jetson-orin-nano-8gb" not in manifest["quantization"]["runs_on"]
        assert "rtx-4090" in manifest["quantization"]["runs_on"]


def test_modelopt_missing_is_one_line(float_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv(modelopt_backend.ENV_VAR, str(tmp_path / "no-such-python"))
    with pytest.raises(
        DllmExportError, match="needs ModelOpt: ModelOpt is not installed"
    ):
        quantize_artifact(
            float_artifact("llada"),
            tmp_path / "out",
            fast("fp8"),
        )
    assert not (tmp_path / "out").exists()


def test_gate_stops_a_broken_quantisation(float_artifact, tmp_path):
    """One calibration state, and the router and the decode head quantised too: with the
    bars every sound INT8 run here passes, the gate stops it. (The seed-0 tiny LLaDA-MoE
    is used because its masked predictions depend on the context; the seed-1 one predicts
    nearly one token everywhere, so any quantisation agrees with it. Measured: sound INT8
    worst-ratio agreement 0.83 here and 0.67 on the random Dream, this one 0.44.)"""
    source = float_artifact("llada-moe", seed=0)
    good = quantize_artifact(source, tmp_path / "good", fast("int8"))
    assert good["valid"] is True
    out = tmp_path / "broken"
    options = fast("int8", quantize_router=True, quantize_head=True, samples=1)
    with pytest.raises(DllmExportError, match="quality gate failed"):
        quantize_artifact(source, out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["valid"] is False and manifest["quality_gate"]["passed"] is False
    with pytest.raises(DllmExportError, match="not marked valid"):
        Generator.from_artifact(out)


def test_quantize_head_puts_the_decode_head_in_blocks_too(float_artifact, tmp_path):
    """--quantize-head (llama.cpp's q8_0 scope): every linear layer, the decode head
    included, becomes an 8-bit MatMulNBits block; nothing is left as a float MatMul."""
    out = tmp_path / "head"
    got = CliRunner().invoke(main, ["quantize", str(float_artifact("llada")), "-o", str(out),
                                    "--precision", "int8", "--method", "nbits",
                                    "--quantize-head", "--no-gate"])
    assert got.exit_code == 0, got.output
    quant = json.loads((out / "manifest.json").read_text())["quantization"]
    assert "decode head" not in quant["excluded"].values()
    canvas = quant["kernels"]["canvas"]
    assert canvas["float"] == 0 and canvas["weight_only"] == canvas["linear_layers"], canvas
    manifest = json.loads((out / "manifest.json").read_text())
    with pytest.raises(DllmExportError, match=r"^--memory lean: model.onnx holds MatMulNBits "
                                              r"blocks, .* use --memory fast for weight-only"):
        OrtBackend(out, manifest, memory="lean")


def test_refusals_are_one_line(float_artifact, tmp_path):
    runner = CliRunner()
    source = str(float_artifact("llada"))
    cases = [
        (
            ["--precision", "fp8", "--profile", "jetson-orin-nano-8gb"],
            "fp8 needs compute",
        ),
        (["--precision", "fp8", "--profile", "cpu"], "does not run fp8"),
        (
            ["--precision", "int4", "--method", "nbits", "--profile", "rtx-4090"],
            "cannot run",
        ),
        (["--precision", "int8", "--method", "awq_clip"], "not a int8 method"),
        (
            ["--precision", "int8", "--calib", str(tmp_path / "empty.txt")],
            "file not found",
        ),
    ]
    for flags, message in cases:
        result = runner.invoke(
            main, ["quantize", source, "-o", str(tmp_path / "x"), *flags]
        )
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
    (tmp_path / "empty.txt").write_text("\n")
    result = runner.invoke(
        main,
        [
            "quantize",
            source,
            "-o",
            str(tmp_path / "x"),
            "--precision",
            "int8",
            "--calib",
            str(tmp_path / "empty.txt"),
        ],
    )
    assert result.exit_code == 1 and "calibration data is empty" in result.output
    with pytest.raises(DllmExportError, match=(
            r"^--method modelopt-max: ModelOpt quantises the canvas graph only, and llada2 "
            r"decodes through the cached graphs; use an ONNX Runtime method")):
        quantize_artifact(float_artifact("llada2"), tmp_path / "z",
                          QuantizeOptions(precision="fp8", method="modelopt-max"))
    assert not (tmp_path / "z").exists()
    sparse = float_artifact("llada-moe", "sparse")
    with pytest.raises(DllmExportError, match="re-export with --moe dense"):
        quantize_artifact(sparse, tmp_path / "y", QuantizeOptions(precision="int8"))


@pytest.mark.parametrize("family", ["llada", "llada2"])
def test_ort_dq_int4_blocks_parse_in_tensorrt_and_run_on_onnx_runtime(family, float_artifact,
                                                                      tmp_path):
    """``--method ort-dq``: ONNX Runtime's round-to-nearest INT4 written as DequantizeLinear
    blocks (opset 21, block 32 along the input dimension) before standard MatMuls, in every
    graph (LLaDA2's cached ones too): check-trt clean, TensorRT profiles listed, and it
    generates on ONNX Runtime; no ModelOpt needed."""
    import onnx

    out = tmp_path / "int4"
    manifest = quantize_artifact(float_artifact(family), out, fast("int4", method="ort-dq"))
    assert manifest["valid"] is True and manifest["quantization"]["format"] == "dq"
    assert "jetson-agx-orin-64gb" in manifest["quantization"]["runs_on"]
    files = [manifest["graph"]["file"]] + [
        g["file"] for g in ((manifest.get("cache") or {}).get("graphs") or {}).values()]
    for name in files:
        model = onnx.load(str(out / name), load_external_data=False)
        blocks = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        weights = {t.name: t for t in model.graph.initializer}
        assert blocks and "MatMulNBits" not in {n.op_type for n in model.graph.node}
        assert all(weights[n.input[0]].data_type == onnx.TensorProto.INT4 for n in blocks)
        assert {a.i for n in blocks for a in n.attribute if a.name == "block_size"} == {32}
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
        assert not [f for f in check_trt(out / name) if f.severity == "error"], name
    assert manifest["trt_compatibility"]["clean"] is True
    generated = Generator.from_artifact(out).generate("hi", gen_length=8, steps=8,
                                                      block_length=8)
    assert generated.forwards >= 1


@pytest.mark.parametrize("family", ["llada-moe", "llada2"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_qmoe_for_ort_moe_artifacts(precision, family, float_artifact, tmp_path):
    """--moe ort artifacts (LLaDA2's default on ONNX Runtime): MoE nodes become QMoE, the
    other linear layers MatMulNBits."""
    import onnx

    out = tmp_path / precision
    manifest = quantize_artifact(
        float_artifact(family, "ort"), out, fast(precision)
    )
    assert manifest["valid"] is True
    assert manifest["quantization"]["method"] == "qmoe"
    assert sorted(manifest["quantization"]["runs_on"]) == ["cpu", "cpu-vnni"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"QMoE", "MatMulNBits"} <= ops and "MoE" not in ops
    generated = Generator.from_artifact(out).generate(
        "hi", gen_length=8, steps=8, block_length=8
    )
    assert generated.forwards >= 1


def test_modelopt_worker_gets_absolute_paths(tmp_path, monkeypatch):
    """The worker runs in a temporary directory, so relative artifact paths (out/q, as a
    user types them) must reach it resolved."""
    import subprocess

    import numpy as np

    from dllm_export.calibration.states import CanvasState

    seen = {}

    def fake_run(command, **kwargs):
        seen.update(json.loads(Path(command[-1]).read_text()), cwd=kwargs.get("cwd"))
        return subprocess.CompletedProcess(command, 0, stdout='{"seconds": 0}\n', stderr="")

    monkeypatch.setattr(modelopt_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(modelopt_backend, "modelopt_python", lambda: Path("python"))
    monkeypatch.setattr(modelopt_backend.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    states = [CanvasState(np.zeros(8, np.int64), np.ones(8, np.int64), 0.5, "forward")]
    modelopt_backend.run_modelopt(Path("float/model.onnx"), Path("out/model.onnx"), "int8",
                                  "max", states, 1, [])
    assert seen["onnx_path"] == str(tmp_path / "float" / "model.onnx")
    assert seen["output_path"] == str(tmp_path / "out" / "model.onnx")
    assert seen["cwd"] != str(tmp_path)


def test_default_bars_pass_sound_int8_and_stop_one_sample_calibration(tmp_path):
    """The gate's own default bars on the shipped masked-diffusion model (exported with
    dense experts, which Q/DQ reaches): minmax INT8 calibrated on 64 states passes, the
    same calibrated on a single state does not. Measured with these gate settings: sound
    agreement 0.983, ELBO +1.3 %, task drop 0.00; one state: 0.925, -1.9 %, task drop
    0.125 (docs/quantization.md has the 16-problem figures)."""
    from dllm_export.shipped import LLADA_MOE_TASKS

    source = tmp_path / "float"
    export_model(LLADA_MOE_TASKS, source, ExportOptions(seq_len=96, moe="dense"))
    light = dict(gate_samples=4, gate_mc_num=8, overwrite=True)
    good = quantize_artifact(source, tmp_path / "good", QuantizeOptions(precision="int8", **light))
    assert good["valid"] is True and good["quality_gate"]["passed"] is True
    with pytest.raises(DllmExportError, match="quality gate failed"):
        quantize_artifact(source, tmp_path / "one", QuantizeOptions(precision="int8", samples=1,
                                                                    **light))
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["valid"] is False


@pytest.fixture(scope="module")
def cached_float(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "llada-moe-dense-cached"
    export_model(tiny_dir("llada-moe"), out, ExportOptions(
        seq_len=SEQ_LEN, moe="dense", cache=True, block_length=8, window=16,
        target="tensorrt"))  # Q/DQ: TensorRT-clean
    return out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cached_graphs_are_quantised_calibrated_and_gated(precision, cached_float, tmp_path):
    """Every cached graph is quantised (Q/DQ calibrated on the states cached decoding feeds
    it), shares the canvas graph's weights, and the gate compares cached decoding."""
    import onnx

    out = tmp_path / precision
    manifest = quantize_artifact(cached_float, out, fast(precision))
    assert manifest["valid"] and manifest["cache"]["graphs"].keys() == {
        "prefill", "step", "window", "decode", "rows"}
    quant = manifest["quantization"]
    graphs = ("prefill", "step", "window", "decode", "rows")
    assert set(quant["cached_graphs"]) == set(graphs)
    assert all(count > 0 for count in quant["cached_graphs"].values())
    op = "QuantizeLinear" if precision == "int8" else "MatMulNBits"
    for graph in graphs:
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        assert op in {n.op_type for n in model.graph.node}, graph
    assert sorted(p.name for p in out.glob("*.data")) == ["model.onnx.data"]
    if precision == "int8":
        states = quant["calibration"]["cached_graphs"]
        assert all(states[g] > 0 for g in graphs)  # rows: from --cache none decoding
        assert manifest["trt_compatibility"]["graphs"] == dict.fromkeys(["canvas", *graphs],
                                                                        True)
    checks = {c["name"]: c for c in manifest["quality_gate"]["checks"]}
    assert checks["generation token agreement (dual cache)"]["passed"]
    generator = Generator.from_artifact(out)
    for mode in ("dual", "block", "none"):
        result = generator.generate("Sort: 3 1 2", chat=True, gen_length=16, steps=16,
                                    block_length=8, cache=mode)
        assert result.forwards >= 2
    assert generator.backend.canvas_runs == 0  # none ran the quantised rows graph


def _attention_and_glu_graph(path: Path) -> None:
    """x -> q/k/v projections (one input, three MatMuls) and a SiLU-gated MLP (gate and
    up share the input; the gate's output feeds Sigmoid and Mul): LLaDA's sharing."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width = 64
    weights = {name: rng.standard_normal((width, width)).astype(np.float32) / 8
               for name in ("wq", "wk", "wv", "wg", "wu", "wd")}
    nodes = [helper.make_node("MatMul", ["x", w], [w + "_out"], name=f"{w}/MatMul")
             for w in ("wq", "wk", "wv")]
    nodes += [
        helper.make_node("Add", ["wq_out", "wk_out"], ["qk"], name="qk"),
        helper.make_node("Add", ["qk", "wv_out"], ["h"], name="h"),
        helper.make_node("MatMul", ["h", "wg"], ["gate"], name="wg/MatMul"),
        helper.make_node("MatMul", ["h", "wu"], ["up"], name="wu/MatMul"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["glu"], name="glu"),
        helper.make_node("MatMul", ["glu", "wd"], ["y"], name="wd/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, width])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(path))


def test_every_shared_activation_pair_is_dedicated_so_every_matmul_fuses(tmp_path):
    """onnxruntime.quantization shares one activation Q/DQ pair among q/k/v and gate/up;
    ONNX Runtime then fuses only the MatMuls with a pair of their own. After the rewrite
    all six run as integer kernels, the copies have scale/zero-point initialisers of their
    own (identical ones would be merged back by CSE), and the dedicated pairs compute
    exactly what the shared pair did."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from dllm_export.calibration import ort_backend, qdq_fusion
    from dllm_export.calibration.kernels import integer_coverage

    float_graph = tmp_path / "float.onnx"
    _attention_and_glu_graph(float_graph)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]
    shared, fused = tmp_path / "shared.onnx", tmp_path / "fused.onnx"
    nodes = [f"{w}/MatMul" for w in ("wq", "wk", "wv", "wg", "wu", "wd")]
    with pytest.MonkeyPatch.context() as patch:  # the quantiser's own output, untouched
        patch.setattr(ort_backend, "prepare_for_fusion", lambda graph: None)
        ort_backend.int8_qdq(float_graph, shared, nodes, [], 1,
                             reader=ort_backend.FeedsReader(feeds))
    ort_backend.int8_qdq(float_graph, fused, nodes, [], 1,
                         reader=ort_backend.FeedsReader(feeds))
    before, after = integer_coverage(shared), integer_coverage(fused)
    assert before["integer"] < 6 and before["linear_layers"] == 6, before
    assert after["integer"] == 6 and after["float"] == 0, after

    model = onnx.load(str(fused))
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    scales = []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            dequant = next(n for n in model.graph.node if n.output[0] == node.input[0])
            assert dequant.op_type == "DequantizeLinear"
            assert len(readers[dequant.output[0]]) == 1  # a pair of its own
            scales.append(dequant.input[1])
    assert len(set(scales)) == 6  # and scale initialisers of its own

    # Same arithmetic: the unoptimised graphs (no fusion) agree exactly once the output
    # pair the rewrite dropped is dropped from the shared graph too.
    reference = onnx.load(str(shared))
    qdq_fusion.drop_unfusable_output_qdq(reference)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(graph):
        session = ort.InferenceSession(graph.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        return session.run(None, feeds[0])[0]

    np.testing.assert_array_equal(run(model), run(reference))
    assert qdq_fusion.dedicate_activation_qdq(onnx.load(str(fused))) == 0  # idempotent


def test_profile_picks_the_nbits_accuracy_level(float_artifact, tmp_path):
    """--profile cpu: the level measured on that CPU (profiles/cpu.yaml), in the graph."""
    import onnx

    out = tmp_path / "int4-cpu"
    manifest = quantize_artifact(float_artifact("llada"), out,
                                 fast("int4", profile="cpu", gate=False))
    assert manifest["quantization"]["backend_report"]["accuracy_level"] == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    levels = {next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)  # op default
              for node in graph.node if node.op_type == "MatMulNBits"}
    assert levels == {0}
