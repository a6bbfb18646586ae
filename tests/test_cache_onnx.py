"""The cached graphs on ONNX Runtime: the same tokens as PyTorch in every cache mode, the
block cache exact, the cache bound in place, weights shared, the contract enforced.

Tolerance: tokens exactly at temperature 0 (fp32 graphs agree with PyTorch to about 5e-7
in log-probability, see the validation table of each artifact).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ARTIFACT_BLOCK, ARTIFACT_SEQ_LEN

from dllm_export import families
from dllm_export.cli import main
from dllm_export.errors import DllmExportError
from dllm_export.runtime import Generator, SamplerConfig, denoise
from dllm_export.runtime.autoregressive import greedy_decode
from dllm_export.runtime.backends.onnxruntime import OrtBackend

GEN = 16


def _backends(family, artifact, tiny_dir):
    torch_gen = Generator.from_checkpoint(tiny_dir(family))
    manifest = json.loads((artifact(family) / "manifest.json").read_text())
    return torch_gen, OrtBackend(artifact(family), manifest), manifest


def _prompt(seed=3):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 300, ARTIFACT_SEQ_LEN - GEN)]


CASES = {
    "schedule": dict(gen_length=GEN, steps=GEN, block_length=ARTIFACT_BLOCK),
    "threshold": dict(gen_length=GEN, steps=GEN, block_length=ARTIFACT_BLOCK, threshold=0.2),
}
MODES = {"llada": ["prefix", "dual", "block"], "llada-moe": ["prefix", "dual", "block"],
         "dream": ["block"]}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_onnx_cached_modes_commit_pytorchs_tokens(family, case, artifact, tiny_dir):
    torch_gen, ort_backend, _ = _backends(family, artifact, tiny_dir)
    entry = families.family(family)
    for mode in MODES[family]:
        config = SamplerConfig(algorithm="llada", cache=mode, early_exit=False, **CASES[case])
        expected = denoise(torch_gen.backend, [_prompt()], config, torch_gen.special,
                           family=entry)
        got = denoise(ort_backend, [_prompt()], config, torch_gen.special, family=entry)
        assert got.sequences.tolist() == expected.sequences.tolist(), mode
        assert got.forwards == expected.forwards


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_onnx_block_cache_is_exact(family, artifact, tiny_dir):
    torch_gen, ort_backend, _ = _backends(family, artifact, tiny_dir)
    steps = {}
    for name, overrides in (("block", dict(cache="block")),
                            ("canvas", dict(cache="none", attention="block_causal"))):
        record = []
        config = SamplerConfig(algorithm="llada", early_exit=False, **CASES["schedule"],
                               **overrides)
        denoise(ort_backend, [_prompt(5)], config, torch_gen.special,
                on_step=lambda info, record=record: record.append(info.canvas.copy()),
                family=families.family(family))
        steps[name] = np.array(record)
    np.testing.assert_array_equal(steps["block"], steps["canvas"])


@pytest.mark.parametrize("family", ["llada-moe", "dream"])
def test_onnx_autoregressive_decoding_matches_pytorch(family, artifact, tiny_dir):
    torch_gen, ort_backend, _ = _backends(family, artifact, tiny_dir)
    rule = families.family(family).positions
    prompt = _prompt()[:12]
    want = greedy_decode(torch_gen.backend, prompt, 20, pad_id=0, positions_rule=rule)
    full = []
    ort_backend.prefill = lambda *a: full.append(a) or type(ort_backend).prefill(ort_backend, *a)
    got = greedy_decode(ort_backend, prompt, 20, pad_id=0, positions_rule=rule)
    assert got.tokens == want.tokens
    assert full == []  # a 12-token prompt is one chunk of the window graph, not the canvas
    long = greedy_decode(ort_backend, _prompt()[:30], 4, pad_id=0, positions_rule=rule)
    assert len(full) == 1 and len(long.tokens) == 4  # 2 chunks would cover > half the canvas
    with pytest.raises(DllmExportError, match="re-export with a larger --seq-len"):
        greedy_decode(ort_backend, prompt, ARTIFACT_SEQ_LEN, pad_id=0)


def test_the_cache_is_bound_in_place_and_only_commits_are_copied(artifact, tiny_dir):
    torch_gen, backend, manifest = _backends("llada", artifact, tiny_dir)
    cache = manifest["cache"]
    per_row = 2 * cache["layers"] * cache["kv_heads"] * cache["head_dim"] * 4  # fp32 k and v
    for mode, commits in (("dual", 0), ("block", GEN // ARTIFACT_BLOCK - 1)):
        before = dict(backend.bytes_moved)
        config = SamplerConfig(algorithm="llada", cache=mode, early_exit=False,
                               **CASES["schedule"])
        result = denoise(backend, [_prompt()], config, torch_gen.special)
        written = backend.bytes_moved["cache_writes"] - before["cache_writes"]
        assert written == commits * ARTIFACT_BLOCK * per_row, mode
        inputs = (backend.bytes_moved["inputs"] - before["inputs"]) / result.forwards
        assert inputs < 0.25 * ARTIFACT_SEQ_LEN * per_row  # ids, positions, mask only
    for name, (array, value) in backend.cache_arrays.items():
        assert value.data_ptr() == array.ctypes.data, name  # the OrtValue is the array


def test_cached_graphs_share_the_weights_file(artifact):
    import onnx

    directory = artifact("llada-moe")
    canvas = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    canvas_bytes = sum(int(next(e.value for e in t.external_data if e.key == "length"))
                       for t in canvas.graph.initializer if t.external_data)
    assert (directory / "model.onnx.data").stat().st_size < 1.05 * canvas_bytes
    assert sorted(p.name for p in directory.glob("*.data")) == ["model.onnx.data"]
    for graph in ("prefill", "step", "window", "decode"):
        model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
        places = {e.value for t in model.graph.initializer for e in t.external_data
                  if e.key == "location"}
        assert places == {"model.onnx.data"}, graph


def test_a_newer_contract_is_refused_in_one_line(artifact, tmp_path):
    copy = tmp_path / "newer"
    shutil.copytree(artifact("llada"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["contract_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["run", str(copy), "--prompt", "hi"])
    assert result.exit_code == 1
    assert "graph contract version 99; this dllm-export reads versions 1 to 3" in result.output
    assert "Traceback" not in result.output


def test_cli_cache_modes_and_refusals(artifact, tiny_dir, tmp_path):
    from dllm_export.export.onnx import ExportOptions, export_model

    runner = CliRunner()
    base = ["run", str(artifact("llada")), "--prompt", "Hello", "--gen-length", "16",
            "--steps", "16", "--block-length", "8"]
    for mode in ("none", "prefix", "dual", "block"):
        result = runner.invoke(main, [*base, "--cache", mode])
        assert result.exit_code == 0, result.output
    canvas_only = tmp_path / "canvas"
    export_model(tiny_dir("llada"), canvas_only, ExportOptions(seq_len=32, validate=False))
    result = runner.invoke(main, ["run", str(canvas_only), "--prompt", "Hi", "--cache", "dual",
                                  "--gen-length", "8", "--steps", "8", "--block-length", "8"])
    assert result.exit_code == 1
    assert "--cache dual: this onnxruntime backend has no cached graphs; export with --cache" \
        in result.output
    result = runner.invoke(main, ["export", str(tiny_dir("llada")), "-o", str(tmp_path / "x"),
                                  "--block-length", "8", "--no-cache"])
    assert result.exit_code == 1 and "drop --no-cache" in result.output
    result = runner.invoke(main, ["export", str(tiny_dir("llada2")), "-o", str(tmp_path / "y"),
                                  "--no-cache"])
    assert result.exit_code == 1
    assert result.output.strip().endswith(
        "--no-cache: llada2 attends block-causal, which only the cached graphs compute; "
        "drop --no-cache")
    assert not (tmp_path / "y").exists()


def test_a_graph_that_does_not_match_its_spec_is_refused(artifact, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(artifact("llada"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["cache"]["graphs"]["step"]["inputs"][0]["shape"] = [1, 9]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    backend = OrtBackend(copy, manifest)
    backend.reset_cache(1, ARTIFACT_SEQ_LEN)
    rows = np.zeros((1, ARTIFACT_BLOCK), dtype=np.int64)
    mask = np.ones((1, ARTIFACT_BLOCK, ARTIFACT_SEQ_LEN + ARTIFACT_BLOCK), dtype=bool)
    with pytest.raises(DllmExportError, match=r"step.onnx: input 'input_ids' is \[1, 8\] in "
                                              r"the graph but \[1, 9\] in manifest.json"):
        backend.cached_step(rows, rows, mask)


@pytest.mark.parametrize("family", ["llada", "llada-moe"])
def test_lean_memory_maps_the_weights_once_and_commits_the_same_tokens(family, artifact,
                                                                       tiny_dir):
    """--memory lean: every graph's external weights are one memory map's arrays (one
    OrtValue per tensor, whatever the number of graphs), nothing is pre-packed, and the
    tokens are the fast mode's in every cache mode (fp32 sums in another order: the
    log-probabilities agree to 1e-5)."""
    import onnx

    torch_gen, fast, manifest = _backends(family, artifact, tiny_dir)
    lean = OrtBackend(artifact(family), manifest, memory="lean")
    entry = families.family(family)
    for mode in ("none", *MODES[family]):
        config = SamplerConfig(algorithm="llada", cache=mode, early_exit=False,
                               **CASES["schedule"])
        want = denoise(fast, [_prompt()], config, torch_gen.special, family=entry)
        got = denoise(lean, [_prompt()], config, torch_gen.special, family=entry)
        assert got.sequences.tolist() == want.sequences.tolist(), mode
    canvas = np.array([_prompt() + [torch_gen.special.mask_id] * GEN])
    ones = np.ones_like(canvas)
    np.testing.assert_allclose(lean.predict(canvas, ones).topk_logprobs,
                               fast.predict(canvas, ones).topk_logprobs, rtol=0, atol=1e-5)
    directory = artifact(family)
    weights = {}  # the fp32 graphs' matrices: what matrix products and gathers read
    for graph in ("model", *(spec.file.removesuffix(".onnx") for spec in lean.graphs.values())):
        model = onnx.load(str(directory / f"{graph}.onnx"), load_external_data=False)
        read = {name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Gather",
                                                                "GatherND") for name in n.input}
        for tensor in model.graph.initializer:
            entry = {e.key: e.value for e in tensor.external_data}
            if entry and tensor.name in read:
                weights[int(entry["offset"])] = int(entry["length"])
    assert list(lean.weights.files) == ["model.onnx.data"]
    assert sorted(offset for _, offset in lean.weights.values) == sorted(weights)
    assert sum(weights.values()) > 0.9 * (directory / "model.onnx.data").stat().st_size
    for session in (lean.session, *lean.sessions.values()):
        assert session.get_session_options().get_session_config_entry(
            "session.disable_prepacking") == "1"


def test_a_cached_generation_lets_go_of_the_canvas_graph(artifact, tiny_dir):
    """A generation that only runs the cached graphs drops the full-canvas session it
    opened at load (its weights are not held); a canvas forward later opens it again."""
    torch_gen, backend, _ = _backends("llada", artifact, tiny_dir)
    config = SamplerConfig(algorithm="llada", cache="dual", early_exit=False,
                           **CASES["schedule"])
    denoise(backend, [_prompt()], config, torch_gen.special)
    assert backend._session is None and backend.canvas_runs == 0
    canvas = np.array([_prompt() + [torch_gen.special.mask_id] * GEN])
    again = backend.predict(canvas, np.ones_like(canvas))
    want = torch_gen.backend.predict(canvas, np.ones_like(canvas))
    np.testing.assert_array_equal(again.topk_ids[..., 0], want.topk_ids[..., 0])
    assert backend._session is not None


def test_memory_mode_is_checked(artifact):
    manifest = json.loads((artifact("llada") / "manifest.json").read_text())
    with pytest.raises(DllmExportError, match=r"^--memory 'small': choose one of fast, lean$"):
        OrtBackend(artifact("llada"), manifest, memory="small")
    got = CliRunner().invoke(main, ["run", str(artifact("llada")), "--prompt", "hi",
                                    "--memory", "lean", "--gen-length", "8", "--steps", "8"])
    assert got.exit_code == 0, got.output


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_the_rows_graph_commits_the_canvas_graphs_tokens(family, artifact, tiny_dir):
    """--cache none with the rows graph (the head over the block's rows only): PyTorch's
    tokens exactly, with no canvas forward; a block wider than its rows falls back to the
    canvas graph. Blocks narrower than the graph's rows (4 of 8) read a part of them."""
    torch_gen, backend, manifest = _backends(family, artifact, tiny_dir)
    assert manifest["cache"]["graphs"]["rows"]["queries"] == ARTIFACT_BLOCK
    entry = families.family(family)
    for block, canvas_forwards in ((ARTIFACT_BLOCK, 0), (4, 0), (GEN, GEN)):
        config = SamplerConfig(algorithm="llada", cache="none", early_exit=False,
                               gen_length=GEN, steps=GEN, block_length=block)
        before = backend.canvas_runs
        expected = denoise(torch_gen.backend, [_prompt()], config, torch_gen.special,
                           family=entry)
        got = denoise(backend, [_prompt()], config, torch_gen.special, family=entry)
        assert got.sequences.tolist() == expected.sequences.tolist(), block
        assert backend.canvas_runs - before == canvas_forwards, block
        assert got.head_rows == (None if canvas_forwards else ARTIFACT_BLOCK)  # for profile
    assert "rows" in backend.sessions


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_predict_rows_is_the_canvas_prediction_of_those_rows(family, artifact):
    """Every span the rows graph covers, the first row (a shifted family's row 0 keeps its
    own prediction) and spans moved back from the canvas' end, on a left-padded canvas:
    the canvas graph's outputs for those rows to 1e-5."""
    manifest = json.loads((artifact(family) / "manifest.json").read_text())
    backend = OrtBackend(artifact(family), manifest)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (1, ARTIFACT_SEQ_LEN))
    attention = np.ones_like(ids)
    attention[:, :5] = 0
    full = backend.predict(ids, attention)
    for first, count in ((0, ARTIFACT_BLOCK), (3, 5), (20, ARTIFACT_BLOCK),
                         (ARTIFACT_SEQ_LEN - 3, 3), (ARTIFACT_SEQ_LEN - 1, 1)):
        assert backend.head_rows(first, count) is not None
        got = backend.predict_rows(ids, attention, first, count)
        want = full.positions(first, first + count)
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        for name in ("topk_logprobs", "neg_entropy", "special_logprobs"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5)
    assert backend.head_rows(0, ARTIFACT_BLOCK + 1) is None  # wider: the canvas graph
