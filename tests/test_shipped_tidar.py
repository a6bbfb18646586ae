"""The shipped autoregressive base (dllm_export/data/ar-base) and its conversion to
diffusion (dllm_export/data/zaya1-tidar): loading, and the decoding modes of one model."""

from __future__ import annotations

from pathlib import Path

import pytest

from dllm_export.eval import tasks

DATA = Path(__file__).resolve().parent.parent / "dllm_export" / "data"
BASE, CONVERTED = DATA / "ar-base", DATA / "zaya1-tidar"
SIZE_CAP_BYTES = 12 * 1024 * 1024  # the "each at most 12 MB"


@pytest.fixture(scope="module")
def converted():
    from dllm_export.runtime import Generator

    return Generator.from_checkpoint(CONVERTED)


@pytest.mark.parametrize("directory", [BASE, CONVERTED], ids=["ar-base", "zaya1-tidar"])
def test_loads_strictly_fp16_under_the_cap(directory):
    from dllm_export.checkpoint import read_safetensors_header
    from dllm_export.models import load_model

    model, checkpoint = load_model(directory)
    assert checkpoint.family == "zaya1"
    assert len(model.moe_blocks()) == checkpoint.config["num_hidden_layers"]
    weights = directory / "model.safetensors"
    assert weights.stat().st_size <= SIZE_CAP_BYTES
    assert {e["dtype"] for e in read_safetensors_header(weights).values()} == {"F16"}


def test_generation_defaults(converted):
    from dllm_export.runtime import Generator

    config = converted.defaults
    assert (config.algorithm, config.tidar_sampler, config.draft_shift) == (
        "tidar", "lossless", True)
    base = Generator.from_checkpoint(BASE).defaults
    assert (base.tidar_sampler, base.draft_shift) == ("autoregressive", None)


def test_lossless_is_autoregressive_token_for_token(converted):
    """At temperature 0 draft-and-verify must give exactly the greedy autoregressive
    output, in fewer forwards."""
    prompts = [tasks.held_out_examples(task, 3)[i].prompt for task in tasks.TASKS
               for i in range(3)]
    forwards = {}
    outputs = {}
    for sampler in ("autoregressive", "lossless"):
        runs = [converted.generate([p], chat=True, tidar_sampler=sampler) for p in prompts]
        outputs[sampler] = [run.tokens[0] for run in runs]
        forwards[sampler] = sum(run.forwards for run in runs)
    assert outputs["lossless"] == outputs["autoregressive"]
    assert forwards["lossless"] < forwards["autoregressive"]


def test_block_mode_refuses_a_model_that_was_not_converted():
    from dllm_export.errors import DllmExportError
    from dllm_export.runtime import Generator

    base = Generator.from_checkpoint(BASE)
    with pytest.raises(DllmExportError, match="draft_shift true"):
        base.generate(["Sort: 4 7 1"], chat=True, tidar_sampler="block")
