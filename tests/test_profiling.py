"""profile: roofline arithmetic shared with plan, cache-mode sweeps beside the
autoregressive baseline, the report files, threshold sweeps and bad input. Measurements run in-process on tiny
checkpoints with one short run per point: only structure and relations are checked, never
speeds."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from dllm_export.cli import main
from dllm_export.errors import DllmExportError
from dllm_export.export.plan import plan_model
from dllm_export.model_shape import model_shape
from dllm_export.profiling import analysis
from dllm_export.profiling.runner import ProfileOptions, profile_target
from dllm_export.profiling.sweeps import parse_sweep
from tests.test_plan import TINY_LLADA, fake_profile

# The tiny models' sampler settings: one block of 8, one token per step by default.
SAMPLER = {"gen_length": 8, "steps": 8, "block_length": 8}


def test_roofline_floor_by_hand_matches_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLADA))
    device = fake_profile()
    shape = model_shape(TINY_LLADA)
    # test_plan's hand count: 6272 FLOP and 1552 bytes at fp16 over 4 tokens; 1 TFLOPS and
    # 1 GB/s make that 6.272e-9 s and 1.552e-6 s, so memory binds.
    measured = {
        "canvas_length": 4,
        "forward": {"median_ms": 1.0},
        "tokens_per_forward": 2.0,
    }
    floor = analysis.diffusion_roofline(shape, device, "fp16", measured)
    assert floor["floor_ms"] == pytest.approx(1.552e-3)
    assert floor["bound"] == "memory"
    assert floor["measured_over_floor"] == pytest.approx(1.0 / 1.552e-3)
    assert floor["achieved_gb_per_s"] == pytest.approx(1552 / 1e-3 / 1e9)
    assert floor["predicted_tokens_per_second"] == pytest.approx(2.0 / 1.552e-6)
    planned = plan_model(
        tmp_path, device, precision="fp16", seq_len=4, batch=1
    ).as_dict()
    assert planned["roofline"]["denoiser_step"]["floor_ms"] == floor["floor_ms"]
    # One token over 4 cached positions: 1568 FLOP; weights 640*2 + (104 + 8)*2 = 1504 bytes
    # plus a cache of 2 x 4 positions x 8 channels x 2 bytes = 128.
    token = analysis.autoregressive_roofline(shape, device, "fp16", 4, None)
    assert token["floor_ms"] == pytest.approx(1.632e-3)
    assert planned["roofline"]["autoregressive_token"]["floor_ms"] == token["floor_ms"]


@pytest.fixture(scope="module")
def threshold_profile(tiny_dir, tmp_path_factory):
    """One in-process profile of the tiny LLaDA-MoE with a two-point threshold sweep."""
    options = ProfileOptions(
        profile="cpu",
        sampler=SAMPLER,
        sweeps=["threshold=0.99,0.0001"],
        prompts=["What is 1 + 2?"],
        warmup=0,
        runs=1,
        rounds=2,
        threads=1,
        isolate=False,
        quality="off",
    )
    result = profile_target(tiny_dir("llada-moe"), options)
    from dllm_export.profiling.report import write_report

    out = tmp_path_factory.mktemp("report")
    return result, write_report(result, out, command="dllm-export profile tiny")


def test_threshold_sweep_rows_and_tpf(threshold_profile):
    result, _ = threshold_profile
    rows = [p for p in result["points"] if p["series"] == "threshold"]
    assert [p["value"] for p in rows] == [0.99, 0.0001]
    assert all(len(p["rounds_median_ms"]) == 2 for p in result["points"])
    high, low = (p["measured"]["tokens_per_forward"] for p in rows)
    assert low > high  # a lower threshold commits more positions per forward
    assert result["autoregressive"]["measured"]["new_tokens"] == SAMPLER["gen_length"]
    moe = result["moe"]
    assert moe["autoregressive_token"]["experts_hit_per_layer"] == moe["top_k"]
    assert moe["autoregressive_token"]["measured_hit_per_layer"] == [2.0, 2.0]


def test_report_files_parse(threshold_profile):
    result, written = threshold_profile
    assert json.loads(written["json"].read_text())["headline"] == result["headline"]
    with open(written["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == [
        "baseline",
        "threshold=0.99",
        "threshold=0.0001",
        "autoregressive",
    ]
    assert float(rows[0]["floor_ms"]) > 0
    text = written["markdown"].read_text()
    for heading in (
        "## Headline",
        "## Diffusion against the autoregressive baseline",
        "## MoE: bytes moved per forward",
        "## Sweep: threshold",
    ):
        assert heading in text
    assert {p.name for p in written["plots"]} >= {
        "diffusion_vs_autoregressive.png",
        "measured_vs_roofline.png",
        "tokens_vs_threshold.png",
    }
    for plot in written["plots"]:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot.name})" in text


def test_compare_two_reports(threshold_profile, tmp_path):
    from dllm_export.profiling.report import compare_reports

    _, written = threshold_profile
    folder = written["json"].parent
    out = compare_reports([folder, folder], tmp_path / "cmp")
    assert len(json.loads(out["json"].read_text())["reports"]) == 2
    assert out["plots"][0].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "text, words",
    [
        ("foo=1", "unknown key 'foo'"),
        ("threshold", "expected KEY=V1,V2"),
        ("threshold=high", "must be a number"),
        ("threshold=1.5", "in (0, 1]"),
        ("steps=0", "at least 1"),
        ("tidar_sampler=block,greedy", "TiDAR samplers are lossless, logit-mix, block, "
                                       "autoregressive (not 'greedy')"),
    ],
)
def test_bad_sweeps(text, words):
    with pytest.raises(DllmExportError, match=None) as caught:
        parse_sweep(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--profile", "no-such-device"], "no such device profile"),
        (["--profile", "cpu", "--sweep", "colour=red"], "unknown key 'colour'"),
        (["--profile", "cpu", "--sweep", "precision=int8"], "dllm-export quantize"),
        (
            ["--profile", "cpu", "--sweep", "block_length=3"],
            "multiple of --block-length 3",
        ),
        (["--profile", "cpu", "--backend", "tensorrt"], "cannot run on TensorRT"),
    ],
)
def test_bad_input_is_one_line(args, words, tiny_dir):
    result = CliRunner().invoke(
        main,
        [
            "profile",
            str(tiny_dir("llada")),
            *args,
            "--gen-length",
            "8",
            "--block-length",
            "8",
            "--in-process",
        ],
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]


def test_cache_sweep_on_onnx_runtime_beside_the_autoregressive_baseline(artifact):
    """Each cache mode is a point; the baseline decodes with the artifact's own graphs."""
    options = ProfileOptions(
        profile="cpu", sampler=SAMPLER, sweeps=["cache=none,prefix,dual,block"],
        prompts=["What is 1 + 2?"], warmup=0, runs=1, threads=1, isolate=False,
        quality="off",
    )
    result = profile_target(artifact("llada-moe"), options)
    rows = [p for p in result["points"] if p["series"] == "cache"]
    assert [p["value"] for p in rows] == ["none", "prefix", "dual", "block"]
    forwards = {p["value"]: p["measured"]["forwards_per_generation"]["median"] for p in rows}
    assert forwards["none"] == forwards["dual"] == forwards["prefix"]  # one block of 8
    assert forwards["block"] == forwards["none"] + 1  # the prompt prefill
    assert [p["measured"]["cache"] for p in rows] == ["none", "prefix", "dual", "block"]
    assert "prefill + decode graphs" in result["autoregressive"]["how"]
    assert result["autoregressive"]["measured"]["new_tokens"] == SAMPLER["gen_length"]


def test_tensorrt_engine_without_tensorrt_is_one_line(tiny_dir, tmp_path):
    """The TensorRT path is guarded: on a machine without it, one line says so."""
    from dllm_export.checkpoint import open_checkpoint
    from dllm_export.jsonio import write_json

    checkpoint = open_checkpoint(tiny_dir("llada"))
    engine = tmp_path / "engine"
    engine.mkdir()
    write_json(
        engine / "manifest.json",
        {
            "format": "dllm-export",
            "kind": "tensorrt",
            "valid": True,
            "family": "llada",
            "precision": "fp16",
            "engine": "model.plan",
            "shapes": {"batch": 1, "seq_len": 32},
            "source": {
                "checkpoint": str(checkpoint.directory),
                "config": checkpoint.config,
                "fingerprint": checkpoint.fingerprint(),
            },
            "generation_defaults": SAMPLER,
            "special_tokens": {"mask_id": 3, "eos_id": 1},
            "vocab_size": 300,
            "topk": 8,
            "special_ids": [1],
        },
    )
    result = CliRunner().invoke(
        main,
        [
            "profile",
            str(engine),
            "--profile",
            "cpu",
            "--in-process",
            "--quality",
            "off",
        ],
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "TensorRT" in lines[0] and "not installed" in lines[0], (
        lines
    )
