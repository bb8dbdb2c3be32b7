"""The Python Trainer API: the same Lightning run as `ltm train`, on a path or on a Dataset, with exact resume."""

from __future__ import annotations

import pytest
import torch
import yaml

from support import TINY
from ltm_core import Trainer, TrainingArguments
from ltm_core.checkpoint import load_model, read_checkpoint
from ltm_core.configuration import compose, model_config
from ltm_core.errors import ConfigError, DataError
from ltm_core.model import TitanModel
from ltm_core.train import train

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. " * 30


# A memory kind that draws no training noise: the tokens memory draws its selection noise from torch's global
# generator, whose position differs between a model built by `ltm train` (after seeding) and one handed to the
# Trainer, and which a checkpoint does not restore; with it, runs agree in distribution but not bit for bit
NOISE_FREE = ["model/memory=slots"]


def _model(seed: int = 42) -> TitanModel:
    torch.manual_seed(seed)  # what `ltm train` does before building its model (seed_everything(cfg.seed))
    return TitanModel(model_config(compose(TINY + NOISE_FREE)))


def _args(out, **kw) -> TrainingArguments:
    """TrainingArguments with the values of support.TINY's run keys."""
    base = dict(output_dir=str(out), per_device_train_batch_size=2, seq_len=64, eval_samples=4, eval_steps=5,
                logging_steps=1, progress_bar=False, accelerator="cpu", max_steps=4, warmup_steps=3)
    return TrainingArguments(**{**base, **kw})


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 65, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, 256, (length,), generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def _same_weights(a, b) -> None:
    wa, wb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_trainer_on_a_path_is_ltm_train(tmp_path):
    """Trainer(model, args, path) trains exactly what `ltm train data=textfile` trains with the same keys."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    cli = train(compose(TINY + NOISE_FREE + ["data=textfile", f"data.path={text}", "data.seed=42", "trainer.max_steps=4",
                                "trainer.val_check_interval=2", "optim.warmup_steps=3", f"output_dir={tmp_path / 'cli'}"]))
    api = Trainer(_model(), _args(tmp_path / "api", eval_steps=2), train_dataset=str(text)).train()
    _same_weights(cli, api)
    assert (tmp_path / "api" / "checkpoints" / "best.ckpt").is_file()
    for name in ("metrics.csv", "config.yaml"):
        assert (tmp_path / "api" / name).is_file()


def test_trainer_on_a_dataset_resumes_exactly(tmp_path):
    """6 steps straight == 3 steps + resume to 6 (weights, optimizer, the dataset's order across epochs)."""
    data, evals = TokenRows(5), TokenRows(3, seed=1)
    straight = Trainer(_model(), _args(tmp_path / "a", max_steps=6, gradient_accumulation_steps=2),
                       data, evals).train()
    first = _args(tmp_path / "b", max_steps=3, schedule_steps=6, gradient_accumulation_steps=2)
    Trainer(_model(), first, data, evals).train()
    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert config["data"]["name"] == "dataset" and config["trainer"]["accumulate_grad_batches"] == 2
    args = _args(tmp_path / "b", max_steps=6, gradient_accumulation_steps=2)
    resumed = Trainer(_model(seed=7), args, data, evals).train(resume_from_checkpoint=True)
    _same_weights(straight, resumed)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "val/bpb" in header
    losses = [r.split(",") for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert len(losses) == 12  # one row per micro-batch of each run, the first run's kept
    model = load_model(resumed)
    assert model.config == _model().config


def test_trainer_without_eval_set_and_save_steps(tmp_path):
    out = tmp_path / "run"
    last = Trainer(_model(), _args(out, max_steps=5, save_steps=2), TokenRows(4)).train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # no validation: no best
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv"]  # one config file
    assert read_checkpoint(last)["global_step"] == 5  # saved at steps 2 and 4, and at the end
    assert "val/loss" not in (out / "metrics.csv").read_text().splitlines()[0]


def test_trainer_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="precision"):
        Trainer(_model(), _args(out, precision="fp8"), TokenRows(2))
    with pytest.raises(DataError, match=r"train_dataset\[0\].*1-D"):
        Trainer(_model(), _args(out), _Wrap(torch.zeros(2, 2, 3, dtype=torch.long)))
    with pytest.raises(DataError, match="outside"):
        Trainer(_model(), _args(out), _Wrap(torch.full((2, 9), 300)))
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        Trainer(_model(), _args(out, max_steps=0), TokenRows(2))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(_model(), _args(out), tmp_path / "missing.txt").train()
    assert not out.exists()


class _Wrap(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def test_trainer_trains_a_model_left_in_eval_mode(tmp_path):
    """A model an InferenceEngine put in eval mode trains as a fresh one: in training mode, so the tokens memory's
    importance penalty (a training-only auxiliary loss) is applied and logged, and the weights equal a fresh run's."""
    from ltm_core import InferenceEngine

    penalty = TINY + ["model.memory.importance_penalty=0.1", "model.memory.select_noise=0"]

    def model():
        torch.manual_seed(42)
        return TitanModel(model_config(compose(penalty)))

    modes = []
    evaluated = model()
    InferenceEngine(evaluated)  # sets the model to eval mode
    assert not evaluated.training
    evaluated.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    data = TokenRows(4)
    last = Trainer(evaluated, _args(tmp_path / "eval", max_steps=2), data).train()
    fresh = Trainer(model(), _args(tmp_path / "fresh", max_steps=2), data).train()
    assert modes and all(modes)
    assert "train/aux_loss" in (tmp_path / "eval" / "metrics.csv").read_text().splitlines()[0]
    _same_weights(fresh, last)
