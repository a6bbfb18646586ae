"""The TensorRT backend against the stand-ins for TensorRT 10.x and 11.x and the CUDA
runtime (real cuda-bindings types, host memory as device memory): its step loop, the
integer stream handle, dynamic dims, bf16/fp8 I/O, engine compatibility, and the
device-resident cache of the cached graphs' engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import DataType
from trt_fixtures import (
    VERSION_IDS,
    VERSIONS,
    install_stand_ins,
    versioned,
    write_artifact,
)

from dllm_export.device_profiles import load_profile
from dllm_export.errors import DllmExportError
from dllm_export.export.build import BuildOptions, build_engine
from dllm_export.runtime.artifact import open_backend


@pytest.fixture
def install_fakes(monkeypatch):
    return install_stand_ins(monkeypatch)


@pytest.fixture(params=VERSIONS, ids=VERSION_IDS)
def trt_version(request):
    return request.param


@pytest.fixture
def fakes(install_fakes, trt_version):
    """The stand-ins of TensorRT 10.x, and again of 11.x."""
    return versioned(install_fakes, trt_version)


@pytest.mark.parametrize("capture_ok", [True, False])
def test_tensorrt_backend_step_loop(tmp_path, fakes, capture_ok):
    log = fakes(capture_ok=capture_ok)
    artifact = write_artifact(tmp_path / "art", seq_len=8)
    build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine",
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    backend, manifest = open_backend(tmp_path / "engine")
    assert (backend.seq_len, backend.batch_size, backend.special_ids) == (8, 1, (1,))
    # the engine reports a dynamic batch (-1): the backend fixed it from the profile
    assert log["context"].shapes == {"input_ids": (1, 8), "attention_mask": (1, 8)}
    assert backend.host["topk_ids"].shape == (1, 8, 4)
    # the stream TensorRT gets is the integer cudaStreamCreate made, not a wrapper's address
    assert backend.stream.handle in log["streams"]
    ids = np.arange(8, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    first = backend.predict(ids, mask)
    np.testing.assert_array_equal(first.topk_ids[..., 0], ids)
    np.testing.assert_array_equal(first.neg_entropy, -mask)
    log["copies"].clear()
    second = backend.predict(ids + 1, mask)  # same mask: only the canvas goes up
    np.testing.assert_array_equal(second.topk_ids[..., 0], ids + 1)
    uploads = [count for kind, count in log["copies"] if kind == 1]
    downloads = [count for kind, count in log["copies"] if kind == 2]
    assert uploads == [8 * 8]  # input_ids only
    assert len(downloads) == 4  # the decode head's four outputs, never logits
    # step 1: a direct launch plus the one the capture records (the fake runs it); step 2
    # replays the graph (the fake replays by launching) or, without a graph, launches again
    assert log["launches"] == 3
    assert log.get("replays") == (1 if capture_ok else None)
    backend.close()
    assert log["cuda"].memory == {}  # every device buffer freed
    assert log["streams"] == set()  # and the stream destroyed


def test_tensorrt_backend_reads_bf16_and_fp8_outputs(tmp_path, fakes):
    """trt.nptype has no bfloat16 or fp8: the backend maps them through ml_dtypes."""
    log = fakes()
    log["engine_dtypes"] = {"topk_logprobs": DataType.BF16, "neg_entropy": DataType.FP8,
                            "special_logprobs": DataType.HALF}
    artifact = write_artifact(tmp_path / "art", seq_len=8)
    build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine",
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    backend, _ = open_backend(tmp_path / "engine")
    assert str(backend.host["topk_logprobs"].dtype) == "bfloat16"
    assert str(backend.host["neg_entropy"].dtype) == "float8_e4m3fn"
    ids = np.arange(8, dtype=np.int64)[None]
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0]])
    pred = backend.predict(ids, mask)
    # values exactly representable in bf16 / e4m3 / fp16, returned as float32
    assert pred.topk_logprobs.dtype == np.float32 and pred.neg_entropy.dtype == np.float32
    np.testing.assert_array_equal(pred.topk_logprobs[0, 0], [0.0, -1.0, -2.0, -3.0])
    np.testing.assert_array_equal(pred.neg_entropy, -mask.astype(np.float32))
    np.testing.assert_array_equal(pred.special_logprobs, np.full((1, 8, 1), -1.0))
    backend.close()
    log["engine_dtypes"] = {"topk_logprobs": DataType.INT4}
    with pytest.raises(DllmExportError, match="I/O tensor 'topk_logprobs' is INT4, a packed "
                                              "sub-byte type"):
        open_backend(tmp_path / "engine")


def test_execute_refuses_a_stream_object_or_a_wrong_handle(fakes):
    """The stand-in takes what the real execute_async_v3 takes: an int that is a stream."""
    from cuda.bindings import runtime as cuda_runtime
    from fake_tensorrt import _Context, _Engine

    log = fakes()
    context = _Engine(log).create_execution_context()
    stream = log["cuda"].cudaStreamCreate()[1]
    with pytest.raises(TypeError, match="incompatible function arguments"):
        context.execute_async_v3(stream)
    assert isinstance(context, _Context) and isinstance(stream, cuda_runtime.cudaStream_t)
    assert context.execute_async_v3(stream.getPtr()) is False  # the wrapper's address


def test_tensorrt_backend_refuses_an_engine_from_elsewhere(tmp_path, fakes, trt_version):
    fakes()
    artifact = write_artifact(tmp_path / "art", seq_len=8)
    build_engine(artifact, load_profile("h100-sxm"), tmp_path / "engine",
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    fakes(version_override="10.9.0.34")  # TensorRT changed since the build
    with pytest.raises(DllmExportError, match=f"engine was built for TensorRT {trt_version} "
                                              "\\(this machine has 10.9.0.34\\).*rebuild it here"):
        open_backend(tmp_path / "engine")


def test_tensorrt_backend_keeps_the_cache_on_the_device(tmp_path, fakes, artifact):
    """Engines for every cached graph; cached decoding commits ONNX Runtime's tokens in
    each mode while the cache stays in device buffers: the prefill engine writes
    it in place, commits are device-to-device copies, and only ids, positions, masks and
    the decode head cross to and from the host."""
    from dllm_export import families
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.generate import SamplerConfig, Special, denoise

    source = artifact("llada", target="tensorrt")  # exported before the fakes replace tensorrt
    log = fakes()
    engine = tmp_path / "engine"
    manifest = build_engine(source, load_profile("h100-sxm"), engine,
                            BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    assert sorted(p.name for p in engine.glob("*.engine")) == [
        "decode.engine", "model.engine", "prefill.engine", "rows.engine", "step.engine",
        "window.engine"]
    assert manifest["cache"]["graphs"]["step"]["engine"] == "step.engine"
    assert set(manifest["build"]["cached_engine_bytes"]) == {"prefill", "step", "window",
                                                              "decode", "rows"}
    backend, _ = open_backend(engine)
    ort = OrtBackend(source, json.loads((source / "manifest.json").read_text()))
    special = Special(**{k: manifest["special_tokens"][k] for k in ("mask_id", "eos_id")},
                      eot_id=manifest["special_tokens"]["eot_id"],
                      pad_id=manifest["special_tokens"]["eos_id"])
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 300, 32)]
    cache_bytes = sum(b.nbytes for b in backend.cache.values())
    assert backend.head_rows(len(prompt), 8) is not None  # none runs the rows engine
    for mode in ("none", "dual", "block"):
        config = SamplerConfig(gen_length=16, steps=16, block_length=8, cache=mode,
                               early_exit=False)
        log["copies"], log["copies_2d"] = [], []
        got = denoise(backend, [prompt], config, special, family=families.family("llada"))
        want = denoise(ort, [prompt], config, special, family=families.family("llada"))
        assert got.sequences.tolist() == want.sequences.tolist(), mode
        assert max(count for _, count in log["copies"]) < cache_bytes / 4, mode
        commits = [c for c in log["copies_2d"] if c[0] == 3]
        assert len(commits) == (2 * 2 if mode == "block" else 0)  # 1 commit x 2 layers x k, v
    backend.close()
    assert log["cuda"].memory == {}


def test_tensorrt_backend_runs_draft_and_verify(tmp_path, fakes, artifact):
    """Draft-and-verify keeps the passing drafts after the call (``commit``, a device copy
    of the last call's presents): on the stand-in engines of a Dream artifact it commits the
    tokens ONNX Runtime commits, which are greedy autoregressive decoding's."""
    from dllm_export.runtime.autoregressive import greedy_decode
    from dllm_export.runtime.backends.onnxruntime import OrtBackend
    from dllm_export.runtime.tidar import tidar_decode

    source = artifact("dream", target="tensorrt")
    log = fakes()
    engine = tmp_path / "engine"
    build_engine(source, load_profile("h100-sxm"), engine,
                 BuildOptions(precision="fp32", timing_cache=tmp_path / "t"))
    backend, _ = open_backend(engine)
    ort = OrtBackend(source, json.loads((source / "manifest.json").read_text()))
    block = backend.max_rows() // 2
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, 300, 12)]
    got, stats = tidar_decode(backend, prompt, 16, block, pad_id=0, mask_id=0,
                              draft_shift=True, early_exit=False)
    want, _ = tidar_decode(ort, prompt, 16, block, pad_id=0, mask_id=0, draft_shift=True,
                           early_exit=False)
    assert got == want == greedy_decode(ort, prompt, 16, pad_id=0).tokens
    assert len([c for c in log["copies_2d"] if c[0] == 3]) >= stats.forwards - 1
    backend.close()
