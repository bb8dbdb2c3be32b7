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


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A TINY model trained for 300 steps on the KJV Bible (~12 s on 2 cores; about 3.5 bits/byte against the
    byte-unigram 4.4): the checkpoint the quantization and export tests share."""
    from support import TINY
    from ltm_core.configuration import compose
    from ltm_core.train import train

    out = tmp_path_factory.mktemp("trained") / "tiny"
    return train(compose(TINY + ["trainer.max_steps=300", "data.batch_size=8", "optim.lr=1e-2",
                                 "trainer.val_check_interval=300", "trainer.log_every_n_steps=50",
                                 f"output_dir={out}"]))
