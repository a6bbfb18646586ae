"""Shared fixtures: tiny checkpoints in the real format, written once per session."""

from __future__ import annotations

import pytest

FAMILIES = ("llada", "llada-moe", "dream")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A function family -> path of a tiny random checkpoint (made on first use)."""
    from dllm_export.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny(family, root / family, seed=1)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """A function family -> (model, checkpoint), loaded in float32 once per session."""
    from dllm_export.models import load_model

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_model(tiny_dir(family))
        return loaded[family]

    return get
