"""Fixtures shared by all tests (helpers live in support.py)."""

from __future__ import annotations

import os

import pytest

from ltm_core import TitanConfig


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    os.environ["LTM_CACHE"] = str(tmp_path_factory.mktemp("ltm-cache"))


@pytest.fixture
def tiny_cfg() -> TitanConfig:
    return TitanConfig(vocab_size=259, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, memory_slots=8,
                       memory_dim=16, segment_length=16, bptt_segments=2)
