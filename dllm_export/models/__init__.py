"""Model families, one small file each, and the strict checkpoint loader.

A family module provides ``ModelArgs`` (its config keys), ``Model`` (export-friendly
PyTorch), ``parameter_counts(args)``, ``tiny_config(vocab, special)`` and optionally
``sanitize(weights, args)``; ``families.py`` registers it. Modules are imported only when
needed so that ``import dllm_export`` stays light and torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from dllm_export import families
from dllm_export.errors import DllmExportError

KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
         "list": (list,), "dict": (dict,)}
WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "list": "a list", "dict": "an object", "None": "null"}


def config_fields(cls, config: dict) -> dict:
    """The config.json values a ``ModelArgs`` dataclass declares, each checked against its
    annotation (``int``, ``float | None``, ...): a wrong type is one line naming the key."""
    out = {}
    for spec in dataclasses.fields(cls):
        if spec.name not in config:
            continue
        value = config[spec.name]
        names = [part.strip() for part in str(spec.type).split("|")]
        if value is None and "None" in names:
            out[spec.name] = value
            continue
        allowed = tuple(t for name in names for t in KINDS.get(name, (object,)))
        wrong_bool = isinstance(value, bool) and "bool" not in names
        if wrong_bool or not isinstance(value, allowed):
            raise DllmExportError(
                f"config.json: field '{spec.name}' = {value!r} must be "
                f"{' or '.join(WORDS.get(name, name) for name in names)}")
        out[spec.name] = value
    return out


def family_module(name: str):
    """The model file of a registered family (``families.REGISTRY``)."""
    return importlib.import_module(f"dllm_export.models.{families.family(name).module}")


def model_args(checkpoint):
    """The family's config dataclass built from the checkpoint's config.json."""
    return family_module(checkpoint.family).ModelArgs.from_dict(checkpoint.config)


def _assign(model, name: str, tensor):
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if leaf in module._parameters:
        import torch

        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_model(directory: str | Path, dtype=None, progress=None):
    """Load a checkpoint into the family's ``Model`` with one copy of the weights.

    The model is built on the meta device; each tensor is read from its shard, checked
    against the expected shape, cast to ``dtype`` (default: float32; "auto" keeps each
    tensor's stored dtype) and assigned in place.
    Every parameter must be filled and every tensor used, or the load fails naming the first
    offending key and its shard.

    Returns (model, checkpoint).
    """
    import torch
    from safetensors import safe_open

    from dllm_export.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(directory)
    module = family_module(checkpoint.family)
    args = module.ModelArgs.from_dict(checkpoint.config)
    dtype = dtype or torch.float32
    keep = dtype == "auto"
    with torch.device("meta"):
        model = module.Model(args)
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    weight_map = dict(checkpoint.weight_map)
    # stored tensors a family does not use (DiffusionGemma's vision tower): skipped, unread
    ignored = getattr(module, "ignored", lambda name: False)
    weight_map = {name: shard for name, shard in weight_map.items() if not ignored(name)}
    # a family that stores tensors stacked (ZAYA1's experts) names the pieces it splits them
    # into: ``expand(name, None, args)`` the names, ``expand(name, tensor, args)`` the views
    expand = getattr(module, "expand", lambda name, tensor, args: None)
    provides = {name: list(expand(name, None, args) or [name]) for name in weight_map}
    extra = {}
    if hasattr(module, "sanitize"):
        extra = module.sanitize({name: None for name in weight_map}, args)
        extra = {k: v for k, v in extra.items() if v is not None}
    for name in sorted(weight_map):
        if not set(provides[name]) <= set(expected):
            raise DllmExportError(
                f"{checkpoint.directory / weight_map[name]}: unexpected tensor '{name}' "
                f"for family {checkpoint.family}; is config.json from the same model?"
            )
    provided = {piece for pieces in provides.values() for piece in pieces}
    for name in expected:
        if name not in provided and name not in extra:
            raise DllmExportError(
                f"{checkpoint.directory}: tensor '{name}' is missing from the checkpoint"
            )
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        path = checkpoint.directory / shard
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types
            raise DllmExportError(f"{path}: cannot be opened as safetensors ({err})") from None
        with handle:
            available = set(handle.keys())
            for name in names:
                if name not in available:
                    raise DllmExportError(f"{path}: tensor '{name}' named in the index is absent")
                tensor = handle.get_tensor(name)
                if not tensor.is_floating_point():
                    raise DllmExportError(
                        f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')}; "
                        f"{checkpoint.family} stores floating-point weights (a quantised "
                        "checkpoint? export the float one and use dllm-export quantize)")
                pieces = expand(name, tensor, args) or {name: tensor}
                for piece, value in pieces.items():
                    want = tuple(expected[piece].shape)
                    if tuple(value.shape) != want:
                        fits = "expected" if piece == name else f"which does not fit '{piece}'"
                        raise DllmExportError(
                            f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, {fits} "
                            f"{want} from config.json")
                    _assign(model, piece, value if keep else value.to(dtype))
                del tensor
                if progress is not None:
                    progress(name)
    for name, tensor in extra.items():
        _assign(model, name, tensor if keep else tensor.to(dtype))
    model.eval()
    return model, checkpoint


def set_moe_strategy(model, strategy: str, block: int | None = None) -> None:
    """Choose how MoE layers run (see models/moe.py); a no-op for dense families."""
    from dllm_export.models.moe import DEFAULT_BLOCK

    for block_module in getattr(model, "moe_blocks", lambda: [])():
        block_module.set_strategy(strategy, block or DEFAULT_BLOCK)
