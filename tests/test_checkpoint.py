"""Reading checkpoints: formats, family detection, strict loading and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dllm_export import DllmExportError
from dllm_export.checkpoint import open_checkpoint, resolve_special_tokens
from dllm_export.inspect import inspect_checkpoint
from dllm_export.models import load_model
from dllm_export.models.tiny import make_tiny
from dllm_export.runtime.tokenizer import TextTokenizer


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def copy(family):
        target = tmp_path / family
        shutil.copytree(tiny_dir(family), target)
        return target

    return copy


@pytest.mark.parametrize("family", ["llada", "llada-moe", "dream"])
def test_tiny_checkpoints_use_the_real_format(family, tiny_dir):
    directory = tiny_dir(family)
    checkpoint = open_checkpoint(directory)
    assert checkpoint.family == family
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    names = set(checkpoint.weight_map)
    expected = {
        "llada": "model.transformer.blocks.0.ff_proj.weight",
        "llada-moe": "model.layers.0.mlp.experts.0.up_proj.weight",
        "dream": "model.layers.0.self_attn.q_proj.bias",
    }[family]
    assert expected in names
    tokenizer = TextTokenizer(directory)
    special = resolve_special_tokens(checkpoint.config, checkpoint.generation_config, tokenizer,
                                     directory)
    mask_name = {"llada": "<|mdm_mask|>", "llada-moe": "<|mdm_mask|>", "dream": "<|mask|>"}[family]
    assert tokenizer.id_to_token(special.mask_id) == mask_name
    assert special.eot_id is not None


def test_single_file_checkpoint_loads(tmp_path):
    directory = make_tiny("llada", tmp_path / "single", shards=1)
    assert (directory / "model.safetensors").is_file()
    model, checkpoint = load_model(directory)
    assert checkpoint.family == "llada"


def test_chat_template_renders(tiny_dir):
    tokenizer = TextTokenizer(tiny_dir("llada"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    dream = TextTokenizer(tiny_dir("dream")).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert dream.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_inspect_reports_moe_active_parameters(tiny_dir, tiny_model):
    info = inspect_checkpoint(tiny_dir("llada-moe"))
    model, _ = tiny_model("llada-moe")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["experts"] == {"total": 8, "per_token": 2}
    assert info["active_parameters_per_token"] < info["parameters"]
    assert info["weight_bytes"]["bf16"] == 2 * info["parameters"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_parameter_counts_match_the_model(family, tiny_dir, tiny_model):
    model, _ = tiny_model(family)
    assert inspect_checkpoint(tiny_dir(family))["parameters"] == sum(
        p.numel() for p in model.parameters())


def test_missing_shard_is_named(copy_of):
    directory = copy_of("llada")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(DllmExportError, match=r"model-00002-of-00002.safetensors: shard named in"):
        open_checkpoint(directory)


def test_wrong_tensor_shape_is_named(copy_of):
    directory = copy_of("dream")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] += 8
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmExportError, match=r"safetensors: tensor 'model.layers.0.mlp.gate_proj."
                                              r"weight' has shape \(160, 64\), expected \(168, 64\)"):
        load_model(directory)


def test_unknown_family_names_the_field(copy_of):
    directory = copy_of("llada")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt2"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmExportError, match=r"config.json: model_type 'gpt2' is not a supported"):
        open_checkpoint(directory)


def test_broken_config_json(copy_of):
    directory = copy_of("llada")
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(DllmExportError, match=r"config.json: not valid JSON \(line 1"):
        open_checkpoint(directory)


def test_unsupported_architecture_switch(copy_of):
    directory = copy_of("llada")
    config = json.loads((directory / "config.json").read_text())
    config["alibi"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmExportError, match=r"field 'alibi' = True is not supported"):
        load_model(directory)


def test_tokenizer_without_mask_token(copy_of):
    directory = copy_of("llada-moe")
    for name in ("config.json", "generation_config.json"):
        data = json.loads((directory / name).read_text())
        data.pop("mask_token_id", None)
        (directory / name).write_text(json.dumps(data))
    tok = json.loads((directory / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    tok["model"]["vocab"].pop("<|mdm_mask|>", None)
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    tok_config.pop("mask_token")
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    checkpoint = open_checkpoint(directory)
    with pytest.raises(DllmExportError, match=r"tokenizer.json: no mask token"):
        resolve_special_tokens(checkpoint.config, checkpoint.generation_config,
                               TextTokenizer(directory), directory)


def test_unexpected_tensor_is_named(copy_of):
    directory = copy_of("llada")
    config = json.loads((directory / "config.json").read_text())
    config["n_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmExportError, match=r"unexpected tensor 'model.transformer.blocks.1"):
        load_model(directory)


def test_make_tiny_refuses_to_overwrite(tiny_dir):
    with pytest.raises(DllmExportError, match=r"already exists; choose another path"):
        make_tiny("llada", tiny_dir("llada"))


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.mark.parametrize("name", ["llada-8b-base", "llada-8b-instruct"])
def test_real_8b_index_names_exactly_our_parameters(name):
    """The published LLaDA-8B config and tensor index (no weights) against the model we build
    from that config: the same tensor names, no more, no fewer."""
    import torch

    from dllm_export.families import detect_family
    from dllm_export.models import family_module

    directory = REFERENCE / name
    if not (directory / "model.safetensors.index.json").is_file():
        pytest.skip("../shared/reference is not present")
    config = json.loads((directory / "config.json").read_text())
    family = detect_family(config, directory / "config.json")
    module = family_module(family)
    with torch.device("meta"):
        model = module.Model(module.ModelArgs.from_dict(config))
    ours = set(dict(model.named_parameters()))
    theirs = set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"])
    assert family == "llada"
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) > 8e9
