"""``inspect``: what a checkpoint is, from its metadata alone (no tensors are read).

Torch-free. A directory with only ``config.json`` (a published config before the download)
is inspected too: sizes from the config, weights and tokenizer reported as absent.
"""

from __future__ import annotations

from pathlib import Path

from dllm_export.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    open_checkpoint,
    read_config,
    read_safetensors_header,
    resolve_special_tokens,
)
from dllm_export.jsonio import read_json
from dllm_export.model_shape import model_shape

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def weight_bytes(params: int) -> dict:
    """Bytes of the weights at each precision (int4 ignores its scales: a lower bound)."""
    return {name: int(params * size) for name, size in BYTES_PER_PARAM.items()}


def inspect_checkpoint(model_dir) -> dict:
    from dllm_export.runtime.tokenizer import TextTokenizer

    directory = Path(model_dir)
    config, name = read_config(directory)
    shape = model_shape(config, name, directory / "config.json")
    has_weights = (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file()
    info = {
        "family": name,
        "parameters": shape.total_parameters(),
        "active_parameters_per_token": shape.active_parameters(),
        "layers": shape.layers,
        "vocab_size": shape.vocab,
        "checkpoint_dtype": "not present (config only)",
        "shards": 0,
    }
    if has_weights:
        checkpoint = open_checkpoint(directory)
        dtypes = set()
        for shard in checkpoint.shard_files:
            dtypes |= {entry["dtype"] for entry in read_safetensors_header(shard).values()}
        info.update(checkpoint_dtype=",".join(sorted(dtypes)),
                    shards=len(checkpoint.shard_files))
    if (directory / "tokenizer.json").is_file():
        generation = directory / "generation_config.json"
        special = resolve_special_tokens(
            config, read_json(generation) if generation.is_file() else {},
            TextTokenizer(directory), directory)
        info["special_tokens"] = {k: v for k, v in special.as_dict().items() if v is not None}
    info["weight_bytes"] = weight_bytes(info["parameters"])
    if shape.experts:
        info["experts"] = {"total": shape.experts, "per_token": shape.experts_per_token}
    return info
