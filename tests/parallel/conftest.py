"""Fixtures of the distributed-training tests: a tiny corpus, the single-process reference run, and the parallel
runs (gloo on CPU, up to 4 processes), each computed once per session."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # parallel_workers, also for forkserver children

from parallel_workers import BASE, NO_NOISE, spawn_jobs  # noqa: E402


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ("the of and to in that he shall unto for his lord they be is him not them it with all thou thy "
             "was god which my me said but ye their have").split()
    path = tmp_path_factory.mktemp("parallel-data") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)))
    return path


@pytest.fixture(scope="session")
def base(corpus_file) -> list[str]:
    return BASE + [f"data.path={corpus_file}"]


@pytest.fixture(scope="session")
def tokens(base) -> list[str]:
    """The default (tokens) memory without its write noise."""
    return base + NO_NOISE


def compose_dict(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from ltm_core.configuration import compose

    return OmegaConf.to_container(compose(overrides), resolve=True)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, base, tokens) -> dict[str, Path]:
    """Output folders: the single-process Lightning reference (global batch 4) and the parallel runs."""
    from ltm_core.configuration import compose
    from ltm_core.train import train

    root = tmp_path_factory.mktemp("parallel-runs")
    out = {name: root / name for name in ("single", "fsdp", "tp2", "tp2_pp2", "resume", "single_delta", "tp2_delta",
                                               "single_slots", "tp2_slots", "pp2_slots")}
    delta = ["model/memory=delta", "model.memory.dim=16"]  # the associative memory: replicated under TP
    slots = ["model/memory=slots", "model.memory.dim=16"]  # the seed design: its read and write projections split
    train(compose(tokens + ["parallel=single", f"output_dir={out['single']}"]))
    train(compose(base + delta + ["parallel=single", f"output_dir={out['single_delta']}"]))
    train(compose(base + slots + ["parallel=single", f"output_dir={out['single_slots']}"]))
    # two processes: fsdp (2 samples per dp rank = the same global batch), tp2, tp2 with the delta and the slots
    # memories, pp2 with the slots memory (segment by segment through the stages)
    spawn_jobs(2, [compose_dict(tokens + ["parallel=fsdp", "data.batch_size=2", f"output_dir={out['fsdp']}"]),
                   compose_dict(tokens + ["parallel=tp2", f"output_dir={out['tp2']}"]),
                   compose_dict(base + delta + ["parallel=tp2", f"output_dir={out['tp2_delta']}"]),
                   compose_dict(base + slots + ["parallel=tp2", f"output_dir={out['tp2_slots']}"]),
                   compose_dict(base + slots + ["parallel=pp2", "parallel.microbatches=2",
                                                f"output_dir={out['pp2_slots']}"])])
    # four processes: tp2_pp2 for 5 steps; and 3 steps, then resume=auto up to 5
    pp = ["parallel=tp2_pp2", "parallel.microbatches=2"]
    spawn_jobs(4, [compose_dict(tokens + pp + [f"output_dir={out['tp2_pp2']}"]),
                   compose_dict(tokens + pp + ["trainer.max_steps=3", "trainer.val_check_interval=3",
                                               f"output_dir={out['resume']}"]),
                   compose_dict(tokens + pp + ["trainer.val_check_interval=3", "resume=auto",
                                               f"output_dir={out['resume']}"])])
    return out
