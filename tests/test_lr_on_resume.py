"""A resume takes the configured optim.lr (after a divergence the line says `optim.lr=LOWER ... resume=auto`: the
schedule goes on at its step from the new base rate, with one line saying so; the same lr resumes exactly as
before), and under fp16-mixed the clip applies to the unscaled gradients."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from support import TINY, invoke
from ltm_core.config import OptimConfig
from ltm_core.training import build_optimizer, build_scheduler, rebase_lr


def test_rebase_lr_goes_on_at_the_step_from_the_new_base_rate():
    cfg = OptimConfig(lr=1e-3, warmup_steps=2)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    lower = OptimConfig(lr=1e-5, warmup_steps=2)
    fresh = build_scheduler(build_optimizer(model, lower), lower, max_steps=10)
    fresh.load_state_dict(state)  # restores base_lrs = [1e-3]: the rate that diverged
    assert fresh.base_lrs[0] == pytest.approx(1e-3)
    assert rebase_lr(fresh, 1e-5) == pytest.approx(1e-3)
    factor = fresh.lr_lambdas[0](5)
    assert [g["lr"] for g in fresh.optimizer.param_groups] == pytest.approx([1e-5 * factor] * 2)
    assert fresh.get_last_lr() == pytest.approx([1e-5 * factor] * 2)
    fresh.optimizer.step()
    fresh.step()  # the schedule goes on from the new base
    assert fresh.get_last_lr()[0] == pytest.approx(1e-5 * fresh.lr_lambdas[0](6))
    assert rebase_lr(fresh, 1e-5) is None  # unchanged: nothing touched


def _lrs(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lr") / "corpus.txt"
    path.write_text("and the lord said unto moses, go in peace. " * 400)
    return path


def test_a_resume_with_a_lower_lr_trains_at_it(tmp_path, text_file):
    out = tmp_path / "run"
    common = [*TINY, "data=textfile", f"data.path={text_file}", f"output_dir={out}", "trainer.val_check_interval=100",
              "data.val_samples=2", "trainer.checkpoint_every_minutes=0", "optim.warmup_steps=1",
              "trainer.log_every_n_steps=1", "optim.schedule_steps=6"]
    first = invoke("train", *common, "trainer.max_steps=3", "optim.lr=1e-3")
    assert first.returncode == 0, first.output[-2000:]
    again = invoke("train", *common, "trainer.max_steps=6", "optim.lr=1e-5", "resume=auto")
    assert again.returncode == 0, again.output[-2000:]
    assert "optim.lr=1e-05 from step 3 (the checkpoint's schedule had 0.001)" in again.stdout.replace("\n", " ")
    lrs = _lrs(out)
    assert max(lr for step, lr in lrs.items() if step >= 3) <= 1e-5
    assert min(lr for step, lr in lrs.items() if step < 3) > 1e-4  # the first run's rate, kept in its rows
    same = invoke("train", *common, "trainer.max_steps=7", "optim.lr=1e-5", "resume=auto")
    assert same.returncode == 0 and "schedule had" not in same.stdout.replace("\n", " ")  # the same lr: no line


def test_fp16_mixed_clips_the_unscaled_gradients(monkeypatch):
    """Manual optimization clips before the plugin's step unscales: the threshold carries the loss scale."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ltm_core.configuration import compose, to_dict
    from ltm_core.lit import TitanLightning

    cfg = to_dict(compose([*TINY, "optim.grad_clip=0.01", "trainer.max_steps=1"]))
    module = TitanLightning(cfg)
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the gradients the update uses (unscaled by then)
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for g in self.param_groups for p in g["params"]
                                                         if p.grad is not None])))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    length = int(cfg["model"]["segment_length"]) * int(cfg["model"]["bptt_segments"])
    data = [(torch.randint(0, 256, (length,)), torch.randint(0, 256, (length,))) for _ in range(2)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    assert seen and seen[0] == pytest.approx(0.01, rel=1e-2)  # without the scaled threshold: 0.01 / 65536
