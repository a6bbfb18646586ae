"""The autoregressive baseline on ONNX Runtime: two small graphs exported from ``CausalLM``.

* ``prefill.onnx``: ``input_ids [1, T]`` (T dynamic) -> ``next_token [1]``, ``logits [1, V]``,
  ``present_key_{i}`` / ``present_value_{i}`` ``[1, Hkv, T, Dh]``;
* ``decode.onnx``: ``input_ids [1, 1]`` plus ``past_key_{i}`` / ``past_value_{i}``
  ``[1, Hkv, P, Dh]`` (P dynamic) -> the same outputs with ``P + 1`` cached positions.

Both come from ``torch.onnx.export(dynamo=True)`` over the family's own modules, so the
backbone and its numerics are the diffusion artifact's. MoE layers use the strategy given
(``ort``, the fused ``com.microsoft::MoE``, reads only the top-k experts of the one token;
``sparse`` pads every expert to a block and so gathers many more). The directory is a cache:
``manifest.json`` records what it was made from and is checked before reuse.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import atomic_directory, read_json, write_json
from dllm_export.profiling.measure import DecodeTimes

FORMAT = "dllm-export-ar-baseline"


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def _export(
    module, example: tuple, path: Path, input_names, output_names, dynamic_shapes, table
) -> None:
    import torch

    log, quiet = io.StringIO(), logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example,
                None,
                dynamo=True,
                opset_version=18,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=table,
                optimize=True,
            )
    except Exception as err:
        raise DllmExportError(
            f"autoregressive baseline export failed: {type(err).__name__}: "
            f"{str(err).splitlines()[0]}"
        ) from err
    finally:
        quiet.setLevel(level)
    program.save(str(path), external_data=True)


def export_decoder(
    model_dir, out_dir, moe: str = "ort", dtype: str = "fp32", report=None
) -> dict:
    """Export (or reuse) the prefill and decode graphs of ``model_dir`` into ``out_dir``.

    Args:
        model_dir: the checkpoint the diffusion artifact was exported from.
        out_dir: the cache directory for this checkpoint, strategy and dtype.
        moe: MoE strategy in the graphs ("ort", "sparse" or "dense"); "ort" falls back to
            "sparse" when the checkpoint has a non-zero expert bias.
        dtype: "fp32", "fp16" or "bf16".
    Returns:
        The directory's manifest.
    """
    import torch

    from dllm_export.checkpoint import open_checkpoint
    from dllm_export.models import load_model, set_moe_strategy
    from dllm_export.profiling.autoregressive import CausalLM

    report = report or (lambda stage, detail="": None)
    out_dir = Path(out_dir)
    fingerprint = open_checkpoint(model_dir).fingerprint()
    wanted = {"format": FORMAT, "fingerprint": fingerprint, "moe": moe, "dtype": dtype}
    if (out_dir / "manifest.json").is_file():
        manifest = read_json(out_dir / "manifest.json")
        if all(manifest.get(k) == v for k, v in wanted.items()):
            return manifest
    report("export", f"autoregressive baseline graphs ({moe} MoE)")
    torch_dtype = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }[dtype]
    model, checkpoint = load_model(model_dir, dtype=torch_dtype)
    used = moe
    if getattr(model, "moe_blocks", lambda: [])():
        try:
            set_moe_strategy(model, moe)
        except DllmExportError:
            used = (
                "sparse"  # e.g. a non-zero expert bias, which the fused op cannot apply
            )
            set_moe_strategy(model, used)
    table = None
    if used == "ort":
        from dllm_export.export.onnx_moe import translation_table

        table = translation_table()
    prefill, decode = (
        CausalLM(model, checkpoint.family, False),
        CausalLM(model, checkpoint.family),
    )
    layers = len(decode.parts.layers)
    outputs = ["next_token", "logits", *cache_names(layers, "present")]
    limit = 4096
    with atomic_directory(out_dir, overwrite=True) as tmp:
        tokens = torch.export.Dim("tokens", min=1, max=limit)
        ids = torch.zeros(1, 8, dtype=torch.long)
        _export(
            prefill,
            (ids,),
            tmp / "prefill.onnx",
            ["input_ids"],
            outputs,
            ({1: tokens},),
            table,
        )
        with torch.no_grad():
            _, _, *cache = prefill(ids)
        past = torch.export.Dim("past", min=1, max=limit - 1)
        _export(
            decode,
            (ids[:, :1], *cache),
            tmp / "decode.onnx",
            ["input_ids", *cache_names(layers, "past")],
            outputs,
            # *past arrives as one tuple argument: its shapes nest the same way
            (None, tuple({2: past} for _ in cache)),
            table,
        )
        manifest = {
            **wanted,
            "moe_used": used,
            "family": checkpoint.family,
            "checkpoint": str(Path(model_dir).resolve()),
            "layers": layers,
            "prefill": "prefill.onnx",
            "decode": "decode.onnx",
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


class OrtDecoder:
    """Greedy decoding with the two graphs on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(
        self, directory: Path, provider: str = "cpu", threads: int | None = None
    ):
        import onnxruntime as ort

        from dllm_export.runtime.backends.onnxruntime import provider_list

        directory = Path(directory)
        self.manifest = read_json(directory / "manifest.json")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = provider_list(provider, directory, {})
        self.prefill = ort.InferenceSession(
            str(directory / "prefill.onnx"), options, providers=providers
        )
        self.step = ort.InferenceSession(
            str(directory / "decode.onnx"), options, providers=providers
        )
        layers = self.manifest["layers"]
        self.outputs = ["next_token", *cache_names(layers, "present")]
        self.past_names = cache_names(layers, "past")

    def decode(self, prompt: list[int], new_tokens: int) -> DecodeTimes:
        ids = np.asarray([prompt], dtype=np.int64)
        started = time.perf_counter()
        token, *cache = self.prefill.run(self.outputs, {"input_ids": ids})
        prefill = time.perf_counter() - started
        times, out = [], []
        for _ in range(new_tokens):
            started = time.perf_counter()
            feeds = dict(zip(self.past_names, cache, strict=True))
            feeds["input_ids"] = token.reshape(1, 1).astype(np.int64)
            token, *cache = self.step.run(self.outputs, feeds)
            out.append(int(token[0]))
            times.append(time.perf_counter() - started)
        return DecodeTimes(prefill, times, out)

    def close(self):
        self.prefill = self.step = None
