"""``inspect``: what a checkpoint is, from its metadata alone (no tensors are read)."""

from __future__ import annotations

from pathlib import Path

from dllm_export.checkpoint import (
    open_checkpoint,
    read_safetensors_header,
    resolve_special_tokens,
)
from dllm_export.models import family_module

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def weight_bytes(params: int) -> dict:
    """Bytes of the weights at each precision (int4 ignores its scales: a lower bound)."""
    return {name: int(params * size) for name, size in BYTES_PER_PARAM.items()}


def inspect_checkpoint(model_dir) -> dict:
    from dllm_export.runtime.tokenizer import TextTokenizer

    checkpoint = open_checkpoint(model_dir)
    module = family_module(checkpoint.family)
    args = module.ModelArgs.from_dict(checkpoint.config)
    counts = module.parameter_counts(args)
    dtypes = set()
    for shard in checkpoint.shard_files:
        dtypes |= {entry["dtype"] for entry in read_safetensors_header(shard).values()}
    tokenizer = TextTokenizer(model_dir)
    special = resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                                     tokenizer, Path(model_dir))
    info = {
        "family": checkpoint.family,
        "parameters": counts["total"],
        "active_parameters_per_token": counts["active"],
        "layers": checkpoint.config.get("n_layers", checkpoint.config.get("num_hidden_layers")),
        "vocab_size": checkpoint.config.get("vocab_size"),
        "checkpoint_dtype": ",".join(sorted(dtypes)),
        "shards": len(checkpoint.shard_files),
        "special_tokens": {k: v for k, v in special.as_dict().items() if v is not None},
        "weight_bytes": weight_bytes(counts["total"]),
    }
    if "experts" in counts:
        info["experts"] = {"total": counts["experts"], "per_token": counts["experts_per_token"]}
    return info
