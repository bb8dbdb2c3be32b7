"""Fixtures shared by all tests (helpers live in support.py)."""

from __future__ import annotations

import os

import pytest

from ltm_core import TitanConfig
from ltm_core.resources import available_cpus
from support import kind_config


def _share_the_cores_among_xdist_workers() -> None:
    """Under pytest-xdist (`-n 2` in pyproject's addopts), each worker gets its share of the cores for torch's
    intra-op threads: 1 each with 2 workers on the 2-core CI machine, where two workers of 2 threads would spin on
    each other's cores. Set as OMP_NUM_THREADS, so that `ltm train` in this process (`set_threads`) and every
    subprocess and launched rank (which inherit it) use the same count; a count the user exported is kept. Serial
    runs (`-n 0`) are unchanged. Tests of the thread choice itself set or clear OMP_NUM_THREADS with monkeypatch."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1 or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = max(1, available_cpus() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_among_xdist_workers()


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    os.environ["LTM_CACHE"] = str(tmp_path_factory.mktemp("ltm-cache"))


@pytest.fixture
def tiny_cfg() -> TitanConfig:
    """The default model (tokens memory, short convolution carried across segments) at test size."""
    return kind_config("tokens")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A TINY model, 64 wide, trained for 300 steps on the KJV Bible (~12 s on 2 cores; about 3.6 bits/byte against
    the byte-unigram 4.4): the checkpoint the quantization and export tests share. 64 wide: its layers' rows hold
    whole 4-bit blocks (64 weights), as every preset's do; at 32 wide a block spans two rows and nf4 cost this model
    4.8-10.5 % of its bits/byte, depending on the thread count that trained it."""
    from support import TINY
    from ltm_core.configuration import compose
    from ltm_core.train import train

    out = tmp_path_factory.mktemp("trained") / "tiny"
    # lr 3e-3: at 1e-2 this width stayed on the byte-unigram plateau (4.08 bits/byte) in one of four runs
    tiny = [o for o in TINY if not o.startswith("model.hidden_size=")] + ["model.hidden_size=64"]
    return train(compose(tiny + ["trainer.max_steps=300", "data.batch_size=8", "optim.lr=3e-3",
                                 "trainer.val_check_interval=300", "trainer.log_every_n_steps=50",
                                 f"output_dir={out}"]))
