"""The llama.cpp peer benchmark's pure parts: the llama-diffusion-cli flags for "one token per
step, blocks of 32" and reading its printed tokens back (no build, no model)."""

from __future__ import annotations

import pytest

from benchmarks.bench_peer_llamacpp import (
    _answer,
    agreement,
    as_items,
    diffusion_cli_args,
    llamacpp_forwards,
    read_items,
)


def _flag(args, name):
    return int(args[args.index(name) + 1])


@pytest.mark.parametrize("gen", [128, 256])
def test_one_token_per_step_counts_the_prompt_into_the_blocks(gen):
    args = diffusion_cli_args(32, gen, 32, 1)
    canvas = 32 + gen
    # -ub is the canvas (max_length), and -c / -b must hold it
    assert _flag(args, "-ub") == _flag(args, "-b") == _flag(args, "-c") == canvas
    assert _flag(args, "--diffusion-block-length") == 32
    steps = _flag(args, "--diffusion-steps")
    # diffusion.cpp: blocks = max_length / block, steps_per_block = steps / blocks, and
    # each generated block holds `block` masks: one token per step
    blocks = canvas // 32
    assert canvas % 32 == 0 and steps % blocks == 0 and steps // blocks == 32
    assert steps == canvas
    assert _flag(args, "-t") == _flag(args, "-tb") == 1
    assert args[args.index("--top-k") + 1] == "1" and args[args.index("--temp") + 1] == "0"
    # gen forwards for the tokens, one for the empty block past the generation
    assert llamacpp_forwards(32, gen, 32) == gen + 1


def test_flags_refuse_what_llama_cpp_asserts_on():
    with pytest.raises(ValueError, match="multiples"):
        diffusion_cli_args(30, 128, 32, 1)  # canvas 158 is no multiple of the block
    with pytest.raises(ValueError, match="multiples"):
        diffusion_cli_args(32, 100, 32, 1)


def test_read_back_of_printed_tokens():
    pieces = {0: b"a", 1: b"b", 5: b""}  # 5: a special token, printed as nothing
    ids = [400, 0, 1, 5, 126000, 401]
    items = as_items(ids, pieces, known=384)
    assert items == [400, b"ab", 126000, 401]
    assert read_items(b"[PAD400]ab[PAD126000][PAD401]") == items
    assert agreement(items, read_items(b"[PAD400]ab[PAD126000][PAD402]")) == {
        "prefix": 3, "equal": 3, "of": 4, "share": 0.75}


@pytest.mark.parametrize("prefix", [b"", b"1.12.535.411 I "])
def test_answer_is_the_text_after_the_timing_line(prefix):
    # what llama-diffusion-cli writes (examples/diffusion: LOG_INF("\\r" progress) per step,
    # LOG_INF("\\ntotal time: ...\\n"), then LOG_INF("\\n%s\\n", text)); with --log-prefix
    # the log's timestamp prefix stands on the empty line before the text
    stderr = (b"\rdiffusion step: 0/160 [ ] 0%\rdiffusion step: 1/160 [ ] 0%"
              b"\ntotal time: 1234.50ms, time per step: 7.7ms, sampling time per step: 0.1ms\n"
              + prefix + b"\n[PAD7]a\nb[PAD9]\n")
    assert _answer(b"", stderr) == b"[PAD7]a\nb[PAD9]"
    assert read_items(_answer(stderr, b"")) == [7, b"a\nb", 9]


def test_a_program_s_peak_memory_is_its_own_not_its_parent_s():
    """ru_maxrss of a child counts its parent's memory at fork (Linux keeps the high-water
    mark across exec): a benchmark holding a model would floor every worker's figure at
    its own. run_program and peak_rss_bytes report the program's own."""
    import sys

    from benchmarks._common import run_program

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # resident, not just reserved
    child = ("b = bytearray(50 * 2**20); b[::4096] = b'\\1' * len(b[::4096]);"
             "from benchmarks._common import peak_rss_bytes; print(peak_rss_bytes())")
    got = run_program([sys.executable, "-c", child], env=None)
    assert got["returncode"] == 0
    for peak in (got["peak_rss"], int(got["stdout"])):
        assert 50 * 2**20 < peak < 300 * 2**20, peak
    assert len(ballast) == 400 * 2**20
