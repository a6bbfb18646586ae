"""Reading a Hugging Face checkpoint directory without torch: config, shards, tokenizer.

A checkpoint is what a user downloads: ``config.json`` with the family's own keys,
``model.safetensors`` or ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``, tokenizer files and ``generation_config.json``.
Nothing here executes remote code or fetches anything.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from dllm_export import families
from dllm_export.errors import DllmExportError
from dllm_export.families import check_config, detect_family
from dllm_export.jsonio import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Names under which checkpoints in the wild store their special tokens.
MASK_TOKEN_NAMES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
EOT_TOKEN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|role_end|>", "<end_of_turn>")


@dataclass
class SpecialTokens:
    mask_id: int
    eos_id: int
    eot_id: int | None = None
    pad_id: int | None = None
    bos_id: int | None = None

    def as_dict(self) -> dict:
        return {
            "mask_id": self.mask_id,
            "eos_id": self.eos_id,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
        }


@dataclass
class Checkpoint:
    directory: Path
    config: dict
    generation_config: dict
    family: str
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name

    @property
    def shard_files(self) -> list[Path]:
        return [self.directory / name for name in sorted(set(self.weight_map.values()))]

    def fingerprint(self) -> str:
        """sha256 over the config, each shard's safetensors header and size, and the
        first and last MiB of each shard: cheap on 16 GB, and it changes when the weights do."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        for shard in self.shard_files:
            size = shard.stat().st_size
            digest.update(f"{shard.name}:{size}".encode())
            with open(shard, "rb") as handle:
                header_len = struct.unpack("<Q", handle.read(8))[0]
                digest.update(handle.read(header_len))
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
        return digest.hexdigest()


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: tensor name -> dtype, shape, offsets."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than 8 bytes")
            header_len = struct.unpack("<Q", raw)[0]
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as err:
        raise DllmExportError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header


def _weight_map(directory: Path) -> dict[str, str]:
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DllmExportError(f"{index_path}: missing or empty 'weight_map'")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise DllmExportError(
                    f"{directory / shard}: shard named in {INDEX_FILE} is missing; "
                    "download it again or fix the index"
                )
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in read_safetensors_header(single)}
    raise DllmExportError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this a checkpoint directory?"
    )


def read_config(directory: Path) -> tuple[dict, str]:
    """config.json of a checkpoint directory, checked against its family: (config, family)."""
    if not directory.is_dir():
        raise DllmExportError(f"{directory}: not a directory")
    config_path = directory / "config.json"
    config = read_json(config_path, "the model configuration")
    family = detect_family(config, config_path)
    check_config(families.family(family), config, config_path)
    return config, family


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and check a checkpoint directory's metadata (no tensors are loaded)."""
    directory = Path(directory)
    config, family = read_config(directory)
    gen_path = directory / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.is_file() else {}
    # a ``diffusion`` section in config.json (block, mask token, sampler of a model converted
    # to diffusion, e.g. ZAYA1-Diffusion, whose own config is not public) overrides
    # generation_config.json
    diffusion = config.get("diffusion")
    if diffusion is not None:
        if not isinstance(diffusion, dict):
            raise DllmExportError(f"{directory / 'config.json'}: field 'diffusion' must be an "
                                  "object (block_length, mask_token_id, tidar_sampler, mix)")
        generation_config = {**generation_config, **diffusion}
    return Checkpoint(
        directory=directory,
        config=config,
        generation_config=generation_config,
        family=family,
        weight_map=_weight_map(directory),
    )


def _first_int(*values):
    for value in values:
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def resolve_special_tokens(
    config: dict, generation_config: dict, tokenizer, directory: Path
) -> SpecialTokens:
    """Find mask / EOS / EoT ids from config, generation config and tokenizer, in that order."""
    from dllm_export.runtime.tokenizer import token_text

    tok_config = tokenizer.config

    def named(*names):
        for name in names:
            if name and tokenizer.token_to_id(name) is not None:
                return tokenizer.token_to_id(name)
        return None

    mask_id = _first_int(config.get("mask_token_id"), generation_config.get("mask_token_id"))
    if mask_id is None:
        mask_id = named(token_text(tok_config.get("mask_token")), *MASK_TOKEN_NAMES)
    if mask_id is None:
        raise DllmExportError(
            f"{directory / 'tokenizer.json'}: no mask token (looked for mask_token_id in "
            f"config.json and for {', '.join(MASK_TOKEN_NAMES)}); a diffusion model needs one"
        )
    size = tokenizer.vocab_size
    if not 0 <= mask_id < size or tokenizer.id_to_token(mask_id) is None:
        raise DllmExportError(
            f"{directory / 'tokenizer.json'}: has no token for the mask id {mask_id} "
            f"(vocabulary of {size}); a diffusion model needs its mask token: use the "
            "model's own tokenizer files")
    eos_id = _first_int(generation_config.get("eos_token_id"), config.get("eos_token_id"))
    if eos_id is None:
        eos_id = named(tokenizer.eos_token)
    if eos_id is None:
        raise DllmExportError(
            f"{directory / 'config.json'}: no eos_token_id and the tokenizer names no eos_token"
        )
    bos_id = _first_int(generation_config.get("bos_token_id"), config.get("bos_token_id"))
    return SpecialTokens(
        mask_id=mask_id,
        eos_id=eos_id,
        eot_id=named(*EOT_TOKEN_NAMES),
        pad_id=_first_int(config.get("pad_token_id"), generation_config.get("pad_token_id")),
        bos_id=bos_id if bos_id is not None else named(tokenizer.bos_token),
    )
