"""Fixtures shared by all tests (helpers live in support.py)."""

from __future__ import annotations

import os

import pytest

from ltm_core import TitanConfig
from support import kind_config


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    os.environ["LTM_CACHE"] = str(tmp_path_factory.mktemp("ltm-cache"))


@pytest.fixture
def tiny_cfg() -> TitanConfig:
    """The default model (tokens memory, short convolution carried across segments) at test size."""
    return kind_config("tokens")
