"""Mixed precision on CPU: `precision=bf16-mixed` trains through the CLI with the default kernels (under CPU autocast
the compiled float32 passes of `ltm_core.cpu_kernels` step aside for PyTorch's ops) and with each memory kind, and
the optimizer that `build_optimizer` makes can be clipped under Lightning's mixed-precision plugin."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from support import TINY, invoke
from ltm_core.config import OptimConfig
from ltm_core.ops import use_cpu_kernels
from ltm_core.training import build_optimizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "corpus.txt"
    path.write_text("the lord said unto him, go in peace. " * 400)
    return path


def _train(out: Path, text_file: Path, *overrides: str) -> list[dict[str, str]]:
    """`ltm train` for 2 steps under bf16-mixed -> the rows of its metrics.csv (exit 0 asserted)."""
    result = invoke("train", *TINY, "data=textfile", f"data.path={text_file}", f"output_dir={out}",
                    "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_samples=2",
                    "trainer.checkpoint_every_minutes=0", "precision=bf16-mixed", *overrides)
    assert result.returncode == 0, (result.exception, result.output[-3000:])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _finite(rows: list[dict[str, str]], key: str) -> list[float]:
    values = [float(row[key]) for row in rows if row.get(key)]
    assert values and all(math.isfinite(v) for v in values), (key, rows)
    return values


def test_bf16_mixed_trains_with_the_default_kernels(tmp_path, text_file):
    rows = _train(tmp_path / "run", text_file)
    assert len(_finite(rows, "train/loss")) == 2
    _finite(rows, "val/loss")


@pytest.mark.parametrize("kind", ["slots", "delta", "neural"])
def test_bf16_mixed_trains_each_memory_kind(tmp_path, text_file, kind):
    _finite(_train(tmp_path / kind, text_file, f"model/memory={kind}", "model.memory.dim=16"), "train/loss")


def test_cpu_kernels_step_aside_under_autocast():
    t = torch.zeros(2, 4)
    assert use_cpu_kernels(t, "auto")  # the float32 path as it was
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_cpu_kernels(t, "auto")
        with torch.autocast("cpu", enabled=False):  # a region that turns autocast off again
            assert use_cpu_kernels(t, "auto")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_the_optimizer_of_a_mixed_precision_run_can_be_clipped(precision):
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    optimizer = build_optimizer(model, OptimConfig())
    assert optimizer.defaults["fused"]  # still the fused update
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "16-mixed" else None
    plugin = MixedPrecision(precision, "cpu", scaler=scaler)
    loss = 100 * model(torch.randn(4, 8)).square().sum()  # gradients of norm well above 1
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:  # unscaled before the clip (the step then finds them unscaled)
        scaler.unscale_(optimizer)
    plugin.clip_gradients(optimizer, clip_val=1.0)  # raised for the fused AdamW
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("made_before", [False, True])
def test_a_crashed_run_leaves_no_empty_folder_it_made(tmp_path, monkeypatch, made_before):
    """Not only bad input: a crash inside training (here a RuntimeError) removes the empty folder Hydra made for
    the run; a folder the user made before stays."""
    import ltm_core.train

    def crash(cfg):
        raise RuntimeError("a bug inside training")

    monkeypatch.setattr(ltm_core.train, "train", crash)
    out = tmp_path / "run"
    if made_before:
        out.mkdir()
    result = invoke("train", *TINY, f"output_dir={out}")
    assert result.returncode == 1, result.output[-2000:]
    assert out.is_dir() == made_before
