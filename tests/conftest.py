"""Shared fixtures: tiny checkpoints in the real format, written once per session."""

from __future__ import annotations

import pytest

FAMILIES = ("llada", "llada-moe", "dream", "llada2")
ARTIFACT_SEQ_LEN = 48
ARTIFACT_BLOCK = 8  # the step graph's block; the window graph takes 16 (+1 for Dream)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards are faster on one thread, and much faster on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A function family -> path of a tiny random checkpoint (made on first use)."""
    from dllm_export.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny(family, root / family, seed=1)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """A function family -> (model, checkpoint), loaded in float32 once per session."""
    from dllm_export.models import load_model

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_model(tiny_dir(family))
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def artifact(tiny_dir, tmp_path_factory):
    """A function (family, moe, target) -> artifact directory with the cached graphs,
    exported once per session (canvas 48, step block 8, prefix window 16). ``target``
    picks the attention form: onnxruntime's MultiHeadAttention or TensorRT's (parser
    clean)."""
    from dllm_export.export.onnx import ExportOptions, export_model

    root = tmp_path_factory.mktemp("artifacts")
    made = {}

    def get(family, moe="sparse", target="onnxruntime"):
        key = (family, moe, target)
        if key not in made:
            made[key] = root / f"{family}-{moe}-{target}"
            options = ExportOptions(seq_len=ARTIFACT_SEQ_LEN, moe=moe, cache=True,
                                    block_length=ARTIFACT_BLOCK, window=16, target=target)
            export_model(tiny_dir(family), made[key], options)
        return made[key]

    return get
