"""``make-tiny``: small random checkpoints indistinguishable in format from the real ones.

Same config keys, same tensor names, sharded safetensors with an index, a byte-level BPE
``tokenizer.json`` trained here with the family's special tokens, the chat template and a
generation config. Everything downstream (load, export, run) is the code that loads an 8B.
"""

from __future__ import annotations

import json
from pathlib import Path

from dllm_export.checkpoint import SINGLE_FILE
from dllm_export.families import NAMES
from dllm_export.jsonio import atomic_directory, write_json
from dllm_export.models import family_module

# A little text for the BPE merges of tiny tokenizers (their models are random anyway).
_SAMPLE_TEXT = """The quick brown fox jumps over the lazy dog. A diffusion language model
fills in masked tokens over several steps instead of writing left to right. Each step the
denoiser predicts every masked position at once, and the sampler commits the most
confident ones. def add(a, b): return a + b. 12 + 34 = 46. Sort 5 3 9 1 -> 1 3 5 9.
Reverse "abc" -> "cba". What is the capital of France? Paris is the capital of France.
""".split("\n")


def build_tokenizer(corpus, vocab_size: int, spec: dict):
    """Train a byte-level BPE tokenizer and add the family's special tokens after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [spec["bos"], spec["eos"], spec["eot"], *spec["extra"], spec["mask"]]
    specials = list(dict.fromkeys(specials))  # Dream's bos and eos are the same token
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(specials)
    return tokenizer


def write_tokenizer(directory: Path, tokenizer, spec: dict, model_max_length: int) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Returns the special token ids by role (bos, eos, eot, mask).
    """
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {role: tokenizer.token_to_id(spec[role]) for role in ("bos", "eos", "eot", "mask")}
    added = {}
    for token in [spec["bos"], spec["eos"], spec["eot"], *spec["extra"], spec["mask"]]:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
    write_json(directory / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["eos"],
        "mask_token": spec["mask"],
        "chat_template": spec["chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    write_json(directory / "special_tokens_map.json", {
        "bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["eos"],
        "mask_token": spec["mask"],
    })
    return ids


def random_tensor(name: str, shape, generator, std: float = 0.02):
    """Normal(0, std) matrices and embeddings; norm weights near 1 but not exactly, so a test
    notices a norm whose weight is ignored."""
    import torch

    owner = name.split(".")[-2]
    if name.endswith("layer_scalar"):  # DiffusionGemma's per-layer stream scale (encoder and
        return 0.8 + 0.4 * torch.rand(shape, generator=generator)  # decoder copies differ)
    if name.endswith(".router.scale"):  # DiffusionGemma's router input scale
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if ".router.proj." in name:  # DiffusionGemma's router: spread, so the top-k is clear
        return 0.3 * torch.randn(shape, generator=generator)
    if name.endswith("qk_norm.temp"):  # ZAYA1's key temperature: zero would hide every key
        return 0.5 + torch.rand(shape, generator=generator)
    if name.endswith("_scale") and "norm" not in owner:  # ZAYA1's residual and input scales
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if ".conv_qk_" in name:  # CCA's convolutions: large enough that a wrong window shows
        return 0.3 * torch.randn(shape, generator=generator)
    if name.endswith("gate.balancing_biases"):  # ZAYA1's selection-only biases: the skip
        # class's at -1, as transformers sets it on load, the experts' near it so it wins too
        bias = -1.0 + 0.01 * torch.randn(shape, generator=generator)
        bias[-1] = -1.0
        return bias
    if ".gate.router_mlp." in name or ".gate.down_proj." in name:  # ZAYA1's router MLP:
        return 0.5 * torch.randn(shape, generator=generator)  # spread, so every class wins
    if "norm" in owner or owner == "ln_f":
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("gate.expert_bias"):  # LLaDA2's selection bias: it must matter in tests
        return 0.05 * torch.randn(shape, generator=generator)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    return std * torch.randn(shape, generator=generator)


def save_sharded(directory: Path, shapes: dict, make_tensor, dtype, shards: int) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` plus the index, or one file if shards == 1.

    Tensors are made one shard at a time (``make_tensor(name, shape)``), so a generated
    checkpoint of a billion parameters never sits in memory whole.
    """
    from safetensors.torch import save_file

    names = list(shapes)
    shards = max(1, min(shards, len(names)))
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        file_name = (SINGLE_FILE if shards == 1
                     else f"model-{index + 1:05d}-of-{shards:05d}.safetensors")
        tensors = {n: make_tensor(n, shapes[n]).to(dtype).contiguous() for n in chunk}
        save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
        del tensors
    if shards > 1:
        write_json(directory / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_checkpoint(out_dir: Path, family: str, config: dict, state, tokenizer,
                     generation: dict, dtype, shards: int, overwrite: bool = False,
                     spec: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically.

    ``state`` is a state dict, or a (shapes, make_tensor) pair for tensors made on demand;
    ``spec`` replaces the family's special tokens and chat template (``TOKENIZER``).
    """
    if isinstance(state, dict):
        weights = state
        state = ({name: tuple(t.shape) for name, t in weights.items()},
                 lambda name, shape: weights[name])
    spec = spec or family_module(family).TOKENIZER
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_tokenizer(tmp, tokenizer, spec, config.get("max_position_embeddings", 4096))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_json(tmp / "generation_config.json", generation)
        save_sharded(tmp, *state, dtype, shards)
    return Path(out_dir)


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16",
              shards: int = 2, overrides: dict | None = None, overwrite: bool = False) -> Path:
    """Write a randomly initialised checkpoint of ``family`` in its real format."""
    import torch

    from dllm_export.errors import DllmExportError

    if family not in NAMES:
        raise DllmExportError(f"--family {family!r}: choose one of {', '.join(NAMES)}")
    module = family_module(family)
    spec = module.TOKENIZER
    tokenizer = build_tokenizer(_SAMPLE_TEXT * 4, 384, spec)
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64  # padded like the real embeddings
    ids = {role: tokenizer.token_to_id(spec[role]) for role in ("bos", "eos", "mask")}
    config = module.tiny_config(vocab, ids)
    config.update(overrides or {})
    args = module.ModelArgs.from_dict(config)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in module.Model(args).state_dict().items()}
    if hasattr(module, "stack"):  # the checkpoint stores some tensors stacked (ZAYA1's experts)
        shapes = module.stack(shapes, args)
    if hasattr(module, "unused_shapes"):  # stored but not read (DiffusionGemma's vision tower)
        shapes.update(module.unused_shapes(config, args))
    generator = torch.Generator().manual_seed(seed)
    state = (shapes, lambda name, shape: random_tensor(name, shape, generator))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                  "mask_token_id": ids["mask"], "_from_model_config": True}
    if hasattr(module, "tiny_generation"):  # a family whose generation config has its own keys
        generation = module.tiny_generation(ids)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[dtype]
    return write_checkpoint(Path(out_dir), family, config, state, tokenizer, generation,
                            torch_dtype, shards, overwrite)
