"""Helpers shared by the tests: tiny configs, token ids, the model contracts, and a runner for `ltm`."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

from ltm_core import TitanConfig, TitanModel
from ltm_core.config import memory_config

# glibc's malloc (Linux): where `ltm_core.resources.keep_freed_memory` applies
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Tiny settings for CLI runs: a few seconds each on 2 CPU cores.
TINY = ["model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=1", "model.memory.slots=8",
        "model.segment_length=16", "model.bptt_segments=2", "data.seq_len=64", "data.batch_size=2",
        "data.val_samples=4", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1", "trainer.progress=false",
        "trainer.accelerator=cpu"]

# Each memory kind at test size (segments of 16, 2 layers, 32 wide), with its options switched on.
KIND_MEMORY = {
    "tokens": dict(kind="tokens", slots=8),
    "tokens_dedup": dict(kind="tokens", slots=8, select_dedup=0.9, importance_detach=False),
    "slots": dict(kind="slots", slots=8, dim=16),
    "delta": dict(kind="delta", slots=8, dim=16),
    "neural": dict(kind="neural", placement="mac", slots=8, dim=16, chunk=4, retrieved=4, persistent=2),
    "neural_mag": dict(kind="neural", placement="mag", slots=8, dim=16, chunk=5),
    "neural_mal": dict(kind="neural", placement="mal", slots=8, dim=16, chunk=16, depth=1, persistent=2),
}


def kind_config(kind: str = "tokens", **changes) -> TitanConfig:
    """A tiny model config with the memory of KIND_MEMORY[kind]; `changes` replace model fields."""
    cfg = TitanConfig(vocab_size=259, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, segment_length=16,
                      bptt_segments=2, kernels="torch", memory=memory_config(dict(KIND_MEMORY[kind])))
    return dataclasses.replace(cfg, **changes)


def tiny_model(cfg: TitanConfig, seed: int = 0, perturb: bool = False) -> TitanModel:
    """The model of `cfg` seeded; with `perturb`, every weight is moved away from its initialisation (the short
    convolution and the importance start at zero or near it, which would hide what they do)."""
    torch.manual_seed(seed)
    model = TitanModel(cfg)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * p.abs().mean().clamp(min=0.05) * torch.randn(p.shape, generator=g))
    return model


def spy_cpu_kernels(monkeypatch, *names: str) -> list[str]:
    """Record, in order, the calls of these `ltm_core.cpu_kernels` functions (still run): which compiled passes ran."""
    from ltm_core import cpu_kernels

    calls: list[str] = []
    for name in names:
        monkeypatch.setattr(cpu_kernels, name, lambda *a, fn=getattr(cpu_kernels, name), name=name, **k:
                            calls.append(name) or fn(*a, **k))
    return calls


def ids(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def streamed(model: TitanModel, tokens: torch.Tensor, sizes: Iterable[int]):
    """Feed `tokens` in pieces of `sizes` (then the rest) -> (concatenated logits, the final state)."""
    state, pieces, pos = None, [], 0
    for size in [*sizes, tokens.shape[1]]:
        if pos >= tokens.shape[1]:
            break
        out = model(tokens[:, pos:pos + size], memory=state)
        pieces.append(out.logits)
        state, pos = out.memory, pos + out.logits.shape[1]
    return torch.cat(pieces, 1), state


def assert_streaming_equals_one_call(model: TitanModel, tokens: torch.Tensor,
                                     sizes: Iterable[int] = (5, 11, 1, 30, 17, 40), atol: float = 1e-5) -> None:
    full = model(tokens)
    logits, state = streamed(model, tokens, sizes)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=atol)
    for mine, ref in zip(state.tensors(), full.memory.tensors()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=atol)


def assert_causal(model: TitanModel, tokens: torch.Tensor, positions: Iterable[int],
                  reaches_from: Optional[int] = None) -> None:
    """Changing token t changes no logit before t; with `reaches_from`, a change of token 0 reaches the logits from
    that position on (through the memory, when it lies segments later)."""
    base = model(tokens).logits
    for t in positions:
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 7) % 256
        torch.testing.assert_close(model(changed).logits[:, :t], base[:, :t], rtol=0, atol=0)
    if reaches_from is not None:
        changed = tokens.clone()
        changed[:, 0] = (changed[:, 0] + 7) % 256
        assert (model(changed).logits[:, reaches_from:] - base[:, reaches_from:]).abs().amax() > 1e-6


# The page width of `ltm`'s output in these tests: the width it gives itself when writing to a pipe or a file
# (ltm_cli/__init__.py), whatever COLUMNS the tests run with. pytest's capture plugin imports readline, which (with
# TERM set) writes COLUMNS=80 and LINES=24 into the C environment of the pytest process: the pytest-xdist workers
# start with them in os.environ, and at 80 columns rich wraps the long paths of the temporary folders (a worker's
# are longer: .../popen-gw0/...) inside the lines the tests look for.
PAGE_COLUMNS = "160"


def run_ltm(*args: str, cwd: Path | None = None, timeout: int = 300, warnings: bool = False
            ) -> subprocess.CompletedProcess:
    """Run `ltm ARGS` as a user would (the console script of this interpreter's environment), its output a pipe
    PAGE_COLUMNS wide; Python's warnings ignored unless `warnings` (then as a user sees them)."""
    exe = Path(sys.executable).with_name("ltm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ltm_cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} if warnings else {
        **os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "COLUMNS": PAGE_COLUMNS})


def invoke(*args: str):
    """`ltm ARGS` in this process (typer's runner): the CLI's code path without a new interpreter's imports."""
    from typer.testing import CliRunner

    from ltm_cli.app import app

    result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def one_error_line(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def inject_nan(monkeypatch, bad_calls: set[int] | None, after: int | None = None) -> None:
    """The training step's loss and gradients become NaN on the given calls (1-based), or on every call after `after`."""
    import ltm_core.lit as lit

    real, calls = lit.windowed_backward, [0]

    def windowed_backward(model, *args, **kwargs):
        calls[0] += 1
        loss, aux = real(model, *args, **kwargs)
        if (bad_calls and calls[0] in bad_calls) or (after is not None and calls[0] > after):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return loss * float("nan"), aux
        return loss, aux

    monkeypatch.setattr(lit, "windowed_backward", windowed_backward)
