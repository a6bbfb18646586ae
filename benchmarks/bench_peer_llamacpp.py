"""CPU peer: llama.cpp's ``llama-diffusion-cli`` against this runtime on ONNX Runtime, on one
LLaDA checkpoint, with the same prompt ids, one token per step, blocks of 32.

    python -m benchmarks.bench_peer_llamacpp --gen 128,256 --rounds 2 --threads 1

The checkpoint: a random LLaDA of 163 M parameters in the real LLaDA format (d_model 512,
8 layers of 8 heads, MLP 2048, vocabulary 126,464: the embedding and the output head are
129.5 M of it), written by ``make-tiny``. llama.cpp: the ``llama-cpp-python`` source
distribution (``--llamacpp-version``; it vendors ``vendor/llama.cpp``), fetched once with
``pip download`` into ``~/.cache/dllm-export/llamacpp/``; only ``llama-diffusion-cli`` is
built, with cmake, once per version and ``--llamacpp-isa`` (GGML_NATIVE off; AVX2, FMA,
F16C on; AMX off: on these VMs the AMX path raises SIGILL). The checkpoint is converted with
the vendored ``convert_hf_to_gguf.py`` to f32 and q8_0 GGUFs. Where llama.cpp cannot be
fetched, built or converted the benchmark prints one line and the record ``{"skipped": ...}``.

The converter runs unchanged, with three patches applied from here (``convert_worker``):

* the tiny BPE tokenizer's pre-tokenizer hash is unknown to the converter (it raises "BPE
  pre-tokenizer was not recognized"): it is declared ``gpt-2`` (byte-level BPE with GPT-2's
  split, which is what ``make-tiny`` trains);
* the ids the 384-token tokenizer does not cover (384..126,463) are written as
  ``[PAD<id>]`` tokens of type USER_DEFINED instead of UNUSED, so llama.cpp prints them
  (it drops UNUSED pieces) and parses them in a prompt: the prompt ``[PAD..]`` x 31 is
  exactly 31 ids, 32 with the BOS llama.cpp adds for LLaDA, and the generated ids read back;
* the chat template is the identity, because ``llama-diffusion-cli`` always applies one
  (it would wrap the prompt in chat markup and change its ids).

None of this changes the weights or the computation.

llama.cpp counts the prompt into its blocks (``diffusion_cli_args``): ``-ub`` is the canvas
(prompt + generation) and ``--diffusion-steps`` is ``block`` steps for each of the canvas'
``(32 + gen) / 32`` blocks, so one token per step is ``steps = 32 + gen``; the prompt's
block comes last, is empty and costs one forward (gen + 1 forwards in all).

Sampling: stock ``llama-diffusion-cli`` cannot express LLaDA's greedy low-confidence rule.
Its sampler chain ends in a ``dist`` sampler, so ``--temp 0`` alone still samples; greedy
needs ``--top-k 1``, after which every candidate's probability (its confidence) is 1.0 and
the tie-break (lower position first) commits the block left to right. llama.cpp runs with
``--temp 0 --top-k 1 --top-p 1`` (greedy, left to right); this runtime is timed with
LLaDA's own rule (argmax, the most confident position first, the full-vocabulary softmax).
Token agreement is checked on the rule both can run: after the timed rounds, one
left-to-right greedy generation per precision over this runtime's full-canvas graph (one
``predict`` per token) is compared with llama.cpp's tokens.

Every measurement is one fresh process (a generation as a user runs it; peak RSS is that
process's own: ``VmHWM`` of this runtime's worker, ``ru_maxrss`` of llama.cpp's process
started from a small launcher; see ``_common.peak_rss_bytes`` for why not from here).
Tokens/s is ``gen`` over the generation loop's own time: llama.cpp's printed ``total time``
(its loop, gen + 1 forwards, cold), this runtime's ``denoise`` time after a two-forward
warm-up that opens the graphs the mode runs (sessions are created lazily);
process wall times (load included) are reported beside. In each round every setting runs
once, in turn; ratios are taken per round, and min / median of the round ratios reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks._common import ROOT, emit, peak_rss_bytes, run_isolated, run_program

LLAMACPP_VERSION = "0.3.36"  # llama-cpp-python; its CHANGELOG names the vendored commit
CACHE = Path.home() / ".cache" / "dllm-export" / "llamacpp"
# 163.1 M parameters in LLaDA's own config keys (models/llada.py tiny_config)
SIZE = {"d_model": 512, "n_heads": 8, "n_kv_heads": 8, "n_layers": 8, "mlp_hidden_size": 2048,
        "vocab_size": 126464, "embedding_size": 126464}
PROMPT_LENGTH = 32
BLOCK = 32
IDENTITY_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
PAD = re.compile(rb"\[PAD(\d+)\]")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
]
ISA = {
    "avx2": ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"],
    "avx512": ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
               "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"],
}
GGUF_TYPES = {"fp32": "f32", "int8": "q8_0"}  # our precision -> llama.cpp's outtype


class Skip(Exception):
    """llama.cpp cannot be fetched, built or converted here."""


# --------------------------------------------------------------------------- flags


def diffusion_cli_args(prompt_length: int, gen: int, block: int, threads: int) -> list[str]:
    """``llama-diffusion-cli`` flags for ``gen`` tokens after a ``prompt_length``-token prompt,
    one token per step, in blocks of ``block`` (model, prompt and output flags not included).

    llama.cpp's block schedule (examples/diffusion/diffusion.cpp) cuts the whole canvas
    (``-ub`` = prompt + generation positions) into ``canvas / block`` blocks, the first one
    starting after the prompt, and gives each block ``steps / blocks`` steps: one token per
    step needs ``block`` steps per block, so ``steps`` = the canvas length. Both divisions
    are asserted there, so the prompt and the generation must be multiples of ``block``.
    """
    if min(prompt_length, gen, block, threads) < 1:
        raise ValueError("prompt_length, gen, block and threads must be positive")
    if gen % block or prompt_length % block:
        raise ValueError(f"the prompt ({prompt_length}) and gen ({gen}) must be multiples of "
                         f"the block ({block}): llama.cpp blocks the whole canvas")
    canvas = prompt_length + gen
    steps = canvas // block * block
    return ["-c", str(canvas), "-b", str(canvas), "-ub", str(canvas),
            "--diffusion-block-length", str(block), "--diffusion-steps", str(steps),
            "-t", str(threads), "-tb", str(threads),  # -tb: the CLI passes -1 without it
            "--temp", "0", "--top-k", "1", "--top-p", "1", "--seed", "0"]


def llamacpp_forwards(prompt_length: int, gen: int, block: int) -> int:
    """Forwards llama.cpp runs for those flags: one per token, and one for each block past
    the generation (the prompt's share of the canvas), which it runs before finding the
    block empty."""
    return gen + prompt_length // block


# --------------------------------------------------------------------------- llama.cpp


def fetch_source(version: str, cache: Path) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist ``version``, fetched once."""
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "examples" / "diffusion" / "diffusion-cli.cpp").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                              "--no-deps", "--no-build-isolation", f"llama-cpp-python=={version}",
                              "-d", str(cache)], capture_output=True, text=True)
        if got.returncode != 0 or not archive.is_file():
            raise Skip(f"pip download llama-cpp-python=={version} failed: "
                       f"{(got.stderr or got.stdout).strip().splitlines()[-1:]}")
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    if not (src / "examples" / "diffusion" / "diffusion-cli.cpp").is_file():
        raise Skip(f"{archive} has no vendor/llama.cpp/examples/diffusion")
    return src


def vendored_commit(src: Path, version: str) -> str | None:
    """The llama.cpp commit llama-cpp-python's CHANGELOG names for ``version``."""
    changelog = src.parent.parent / "CHANGELOG.md"
    if not changelog.is_file():
        return None
    section = changelog.read_text().split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else None


def cmake_program() -> str:
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found:
        return found
    got = subprocess.run([sys.executable, "-m", "pip", "install", "cmake"], capture_output=True,
                         text=True)
    found = shutil.which("cmake", path=str(Path(sys.executable).parent))
    if got.returncode != 0 or not found:
        raise Skip("cmake is not installed and pip install cmake failed")
    return found


def build_cli(src: Path, build: Path, isa: str) -> Path:
    """``llama-diffusion-cli`` built once into ``build`` (a rerun finds the binary)."""
    binary = build / "bin" / "llama-diffusion-cli"
    if binary.is_file():
        return binary
    cmake = cmake_program()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log = build.parent / f"{build.name}.log"
    build.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for command in ([cmake, "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS,
                         *ISA[isa]],
                        [cmake, "--build", str(build), "--target", "llama-diffusion-cli",
                         "-j", str(os.cpu_count() or 2)]):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = log.read_text().strip().splitlines()[-1:]
                raise Skip(f"building llama-diffusion-cli failed ({log}): {tail}")
    if not binary.is_file():
        raise Skip(f"the build made no {binary}")
    return binary


def convert_worker(src: str, checkpoint: str, outtype: str, out: str) -> None:
    """The vendored converter with the three patches of the module docstring."""
    sys.path[:0] = [src, str(Path(src) / "gguf-py")]  # its own gguf package, as it does itself
    import gguf
    from conversion import base
    from conversion.llada import LLaDAModel

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    stock_vocab = LLaDAModel.get_vocab_base

    def vocab(self):
        tokens, types, pre = stock_vocab(self)
        types = [gguf.TokenType.USER_DEFINED if t == gguf.TokenType.UNUSED and
                 tokens[i].startswith("[PAD") else t for i, t in enumerate(types)]
        return tokens, types, pre

    LLaDAModel.get_vocab_base = vocab
    stock_template = gguf.GGUFWriter.add_chat_template
    gguf.GGUFWriter.add_chat_template = lambda self, value: stock_template(self, IDENTITY_TEMPLATE)
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outtype", outtype, "--outfile", out]
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()


def convert(src: Path, checkpoint: Path, outtype: str, out: Path) -> Path:
    if out.is_file():
        return out
    partial = out.with_suffix(".partial")
    got = subprocess.run([sys.executable, "-m", "benchmarks.bench_peer_llamacpp", "convert-worker",
                          str(src), str(checkpoint), outtype, str(partial)],
                         capture_output=True, text=True, cwd=ROOT)
    if got.returncode != 0 or not partial.is_file():
        raise Skip(f"convert_hf_to_gguf.py --outtype {outtype} failed: "
                   f"{got.stderr.strip().splitlines()[-1:]}")
    partial.rename(out)
    return out


def run_llamacpp(binary: Path, gguf_file: Path, prompt_text: str, gen: int,
                 threads: int) -> dict:
    """One generation in its own process: loop time, wall time, peak RSS, output bytes."""
    command = [str(binary), "-m", str(gguf_file), "-p", prompt_text,
               *diffusion_cli_args(PROMPT_LENGTH, gen, BLOCK, threads)]
    got = run_program(command, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    stdout, stderr, wall = got["stdout"], got["stderr"], got["wall_seconds"]
    text = stdout + stderr
    timing = re.search(rb"total time: ([0-9.]+)ms", text)
    if got["returncode"] != 0 or not timing:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({got['returncode']}):\n"
                           f"{text[-3000:].decode(errors='replace')}")
    seconds = float(timing.group(1)) / 1000
    answer = _answer(stdout, stderr)
    return {"seconds": seconds, "wall_seconds": wall, "tokens_per_second": gen / seconds,
            # its progress line comes before every forward
            "forwards": len(re.findall(rb"diffusion step: \d+/", text)),
            "peak_rss": got["peak_rss"], "output": answer}


def _answer(stdout: bytes, stderr: bytes) -> bytes:
    """The generated text llama-diffusion-cli prints after its ``total time`` line (as
    ``LOG_INF("\\n%s\\n")``: a line of the log's own prefix, then the text)."""
    for stream in (stdout, stderr):
        found = re.search(rb"total time: [^\n]*\n(?:[0-9.]+ [A-Z] )?\n", stream)
        if found:
            tail = stream[found.end():]
            return tail[:-1] if tail.endswith(b"\n") else tail
    return b""


# --------------------------------------------------------------------------- tokens


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    visible = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = list(visible), 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, codes, strict=True)}


def piece_table(checkpoint: Path) -> tuple[dict[int, bytes], int]:
    """What llama.cpp prints for each id the tokenizer has (special ones: nothing), and the
    tokenizer's size; every id past it prints as ``[PAD<id>]``."""
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    decoder = _byte_decoder()
    pieces = {i: bytes(decoder[c] for c in token) for token, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        pieces[added["id"]] = b"" if added.get("special") else added["content"].encode()
    return pieces, max(pieces) + 1


def as_items(ids, pieces: dict[int, bytes], known: int) -> list:
    """Ids as llama.cpp's printed text can be read back: a ``[PAD]`` id as itself, a run of
    ids inside the small tokenizer as the bytes they print."""
    items, run = [], b""
    for token in ids:
        token = int(token)
        if token >= known:
            if run:
                items.append(run)
                run = b""
            items.append(token)
        else:
            run += pieces.get(token, b"")
    return items + ([run] if run else [])


def read_items(text: bytes) -> list:
    items, at = [], 0
    for found in PAD.finditer(text):
        if found.start() > at:
            items.append(text[at:found.start()])
        items.append(int(found.group(1)))
        at = found.end()
    return items + ([text[at:]] if at < len(text) else [])


def agreement(a: list, b: list) -> dict:
    """Leading items equal, and the share of equal items position by position."""
    prefix = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        prefix += 1
    length = max(len(a), len(b), 1)
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return {"prefix": prefix, "equal": same, "of": length, "share": round(same / length, 4)}


# --------------------------------------------------------------------------- this runtime


def ours_worker(artifact: str, gen: str, mode: str, threads: str, prompt: str) -> None:
    """One generation on ONNX Runtime in this process. ``mode`` is ``cache[:memory]``
    (``dual:lean``: the dual cache over one shared copy of the weights); ``left-to-right``
    is the agreement rule (greedy, leftmost masked position first, one full-canvas forward
    each)."""
    started = time.perf_counter()
    cache, _, memory = mode.partition(":")
    import numpy as np

    from dllm_export import families
    from dllm_export.runtime import Generator
    from dllm_export.runtime.generate import denoise

    gen, ids = int(gen), [int(t) for t in prompt.split(",")]
    generator = Generator.from_artifact(artifact, threads=int(threads), memory=memory or "fast")
    mask = generator.special.mask_id
    record = {"artifact": artifact, "cache": cache, "memory": memory or "fast", "gen": gen}
    if cache == "left-to-right":
        backend = generator.backend
        canvas = np.array([ids + [mask] * gen], dtype=np.int64)
        attention = np.ones_like(canvas)
        backend.predict(canvas, attention)  # warm-up
        loaded = time.perf_counter() - started
        begin = time.perf_counter()
        for position in range(len(ids), len(ids) + gen):
            canvas[0, position] = backend.predict(canvas, attention).topk_ids[0, position, 0]
        seconds = time.perf_counter() - begin
        tokens, forwards = canvas[0, len(ids):].tolist(), gen
    else:
        family = families.family(generator.family)

        def config(length, steps):
            return generator.config(algorithm="llada", gen_length=length, block_length=BLOCK,
                                    steps=steps, cache=cache, temperature=0.0,
                                    remasking="low_confidence", threshold=None, cfg_scale=0.0,
                                    early_exit=False)

        # open every graph this mode runs (ONNX Runtime sessions are made on first use)
        denoise(generator.backend, [ids], config(BLOCK, 2), generator.special, family=family)
        loaded = time.perf_counter() - started
        result = denoise(generator.backend, [ids], config(gen, gen), generator.special,
                         family=family)
        seconds, forwards = result.seconds, result.forwards
        tokens = result.sequences[0, result.prompt_length:].tolist()
    record.update({"seconds": seconds, "tokens_per_second": gen / seconds,
                   "forwards": forwards, "load_seconds": loaded, "tokens": tokens,
                   "peak_rss": peak_rss_bytes()})
    emit(record)


def dllm(*args: str) -> None:
    command = [sys.executable, "-c", "from dllm_export.cli import entry_point; entry_point()",
               *args]
    got = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if got.returncode != 0:
        raise RuntimeError(f"dllm-export {' '.join(args)} failed:\n{got.stderr[-3000:]}")


def current(artifact: Path) -> bool:
    """An artifact of this graph contract (an older one is exported again: the rows graph
    of contract 3 is what --cache none runs)."""
    from dllm_export import contract

    manifest = artifact / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get(
        "contract_version") == contract.CONTRACT_VERSION


def artifacts(work: Path, checkpoint: Path, gen: int, precisions: list[str]) -> dict:
    """The exported artifact (with the cached graphs) and its INT8 form, for one canvas."""
    length = PROMPT_LENGTH + gen
    fp32 = work / f"onnx-L{length}"
    if not current(fp32):
        dllm("export", str(checkpoint), "-o", str(fp32), "--seq-len", str(length), "--cache",
             "--block-length", str(BLOCK), "--window", str(gen), "--overwrite")
    out = {"fp32": fp32}
    if "int8" in precisions:
        # MatMulNBits 8-bit, blocks of 32, no calibration, the decode head too: the closest
        # to llama.cpp's q8_0 (which quantises its output matrix as well)
        int8 = work / f"onnx-L{length}-int8-nbits-head"
        if not current(int8):
            dllm("quantize", str(fp32), "-o", str(int8), "--precision", "int8", "--method",
                 "nbits", "--quantize-head", "--no-gate", "--overwrite")
        out["int8"] = int8
    return out


def make_checkpoint(work: Path) -> Path:
    from dllm_export.models.tiny import make_tiny

    path = work / "llada-163m"
    if not (path / "config.json").is_file():
        make_tiny("llada", path, dtype="float32", shards=1, overrides=SIZE, overwrite=True)
    return path


def prompt_ids(checkpoint: Path, known: int) -> list[int]:
    """BOS (llama.cpp adds it for LLaDA) and 31 ids past the small tokenizer, fixed seed."""
    import numpy as np

    bos = json.loads((checkpoint / "generation_config.json").read_text())["bos_token_id"]
    rng = np.random.default_rng(0)
    return [bos, *(int(t) for t in rng.integers(known, SIZE["vocab_size"],
                                                size=PROMPT_LENGTH - 1))]


# --------------------------------------------------------------------------- main


def ours_modes(modes: list[str], precision: str) -> list[str]:
    """The modes run at a precision: the INT8 artifact's MatMulNBits blocks refuse
    ``--memory lean`` (they only run fast pre-packed)."""
    return [m for m in modes if precision == "fp32" or not m.endswith(":lean")]


def _ratios(top, bottom) -> dict:
    values = [a["tokens_per_second"] / b["tokens_per_second"]
              for a, b in zip(top, bottom, strict=True)]
    return {"per_round": [round(v, 3) for v in values], "min": round(min(values), 3),
            "median": round(statistics.median(values), 3)}


def _summary(runs: list[dict]) -> dict:
    return {"tokens_per_second": [round(r["tokens_per_second"], 3) for r in runs],
            "median_tokens_per_second": round(statistics.median(
                r["tokens_per_second"] for r in runs), 3),
            "seconds": [round(r["seconds"], 2) for r in runs],
            "wall_seconds": [round(r["wall_seconds"], 2) for r in runs],
            "forwards": runs[0]["forwards"],
            "peak_rss_mb": max(round(r["peak_rss"] / 2**20, 1) for r in runs)}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "convert-worker":
        return convert_worker(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "ours-worker":
        return ours_worker(*sys.argv[2:7])
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen", default="128,256", help="generation lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-modes", default="dual,dual:lean",
                        help="this runtime's cache modes beside none, comma-separated, each "
                             "cache[:memory] (memory: fast, the default, or lean)")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--llamacpp-version", default=LLAMACPP_VERSION)
    parser.add_argument("--llamacpp-isa", choices=sorted(ISA), default="avx2")
    parser.add_argument("--llamacpp-cache", type=Path, default=CACHE)
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the left-to-right generations of the token check")
    parser.add_argument("--work", type=Path, default=Path("out/bench-peer"))
    args = parser.parse_args()
    gens = [int(g) for g in args.gen.split(",")]
    precisions = args.precisions.split(",")
    modes = ["none", *(m for m in args.cache_modes.split(",") if m and m != "none")]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    header = {"benchmark": "peer_llamacpp", "threads": args.threads,
              "llamacpp_version": args.llamacpp_version, "llamacpp_isa": args.llamacpp_isa}

    checkpoint = make_checkpoint(work)
    pieces, known = piece_table(checkpoint)
    try:
        src = fetch_source(args.llamacpp_version, args.llamacpp_cache)
        header["llamacpp_commit"] = vendored_commit(src, args.llamacpp_version)
        binary = build_cli(src, args.llamacpp_cache /
                           f"build-{args.llamacpp_version}-{args.llamacpp_isa}",
                           args.llamacpp_isa)
        ggufs = {p: convert(src, checkpoint, GGUF_TYPES[p],
                            work / f"llada-163m-{GGUF_TYPES[p]}.gguf") for p in precisions}
    except Skip as why:
        print(f"bench_peer_llamacpp: skipped: {why}", file=sys.stderr)
        emit({**header, "skipped": str(why)})
        return
    import onnxruntime

    from dllm_export.inspect import inspect_checkpoint

    header.update({"onnxruntime": onnxruntime.__version__, "checkpoint": str(checkpoint),
                   "parameters": inspect_checkpoint(checkpoint)["parameters"],
                   "prompt_length": PROMPT_LENGTH, "block": BLOCK})
    prompt = prompt_ids(checkpoint, known)
    prompt_text = "".join(f"[PAD{t}]" for t in prompt[1:])  # llama.cpp adds the BOS
    built = {g: artifacts(work, checkpoint, g, precisions) for g in gens}

    settings = []  # (gen, side, precision, mode)
    for gen in gens:
        for precision in precisions:
            settings.append((gen, "llama.cpp", precision, "none"))
            settings += [(gen, "ours", precision, mode) for mode in ours_modes(modes, precision)]
    runs = {s: [] for s in settings}
    for round_index in range(args.rounds):
        for setting in settings:
            gen, side, precision, mode = setting
            if side == "llama.cpp":
                run = run_llamacpp(binary, ggufs[precision], prompt_text, gen, args.threads)
                run["items"] = read_items(run.pop("output"))
            else:
                begun = time.perf_counter()
                run = run_isolated("benchmarks.bench_peer_llamacpp", "ours-worker",
                                   str(built[gen][precision]), str(gen), mode,
                                   str(args.threads), ",".join(map(str, prompt)))
                run["wall_seconds"] = time.perf_counter() - begun
                run["items"] = as_items(run.pop("tokens"), pieces, known)
            runs[setting].append(run)
            emit({**header, "round": round_index, "gen": gen, "side": side,
                  "precision": precision, "cache": mode,
                  **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()
                     if k not in ("items", "artifact")},
                  "read_back": len(run["items"])})

    reference = {}
    if not args.no_agreement:
        for gen in gens:
            for precision in precisions:
                run = run_isolated("benchmarks.bench_peer_llamacpp", "ours-worker",
                                   str(built[gen][precision]), str(gen), "left-to-right",
                                   str(args.threads), ",".join(map(str, prompt)))
                reference[(gen, precision)] = as_items(run["tokens"], pieces, known)
                emit({**header, "gen": gen, "side": "ours", "precision": precision,
                      "cache": "left-to-right", "seconds": round(run["seconds"], 3),
                      "tokens_per_second": round(run["tokens_per_second"], 3),
                      "peak_rss": run["peak_rss"]})

    results = []
    for gen in gens:
        for precision in precisions:
            llama = runs[(gen, "llama.cpp", precision, "none")]
            row = {"gen": gen, "precision": precision, "gguf": GGUF_TYPES[precision],
                   "llama.cpp": _summary(llama),
                   "llama.cpp_read_back_complete": all(
                       len(r["items"]) == gen and all(isinstance(i, int) for i in r["items"])
                       for r in llama)}
            first = llama[0]["items"]
            row["llama.cpp_rounds_agree"] = all(r["items"] == first for r in llama)
            for mode in ours_modes(modes, precision):
                ours = runs[(gen, "ours", precision, mode)]
                row[f"ours_{mode}"] = {**_summary(ours), "over_llama.cpp": _ratios(ours, llama),
                                       "peak_rss_over_llama.cpp": round(
                                           max(r["peak_rss"] for r in ours)
                                           / max(r["peak_rss"] for r in llama), 3)}
                if mode != "none":
                    row[f"ours_{mode}"]["tokens_vs_ours_none"] = agreement(
                        ours[0]["items"], runs[(gen, "ours", precision, "none")][0]["items"])
            if (gen, precision) in reference:
                row["left_to_right_vs_llama.cpp"] = agreement(reference[(gen, precision)], first)
            if precision != precisions[0]:
                row["llama.cpp_vs_its_" + GGUF_TYPES[precisions[0]]] = agreement(
                    first, runs[(gen, "llama.cpp", precisions[0], "none")][0]["items"])
                row[f"ours_none_vs_ours_{precisions[0]}"] = agreement(
                    runs[(gen, "ours", precision, "none")][0]["items"],
                    runs[(gen, "ours", precisions[0], "none")][0]["items"])
            results.append(row)
    emit({**header, "rounds": args.rounds, "modes": modes, "results": results})


if __name__ == "__main__":
    main()
