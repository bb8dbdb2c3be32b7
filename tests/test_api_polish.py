"""Python API and CLI polish: an eval-mode model trains without Lightning's eval-mode warning, a resume with
nothing to train says so, Lightning's resume/ddp noise is filtered, generate's max_new_tokens is checked, the
Trainer's output-dir message names its own arguments, and a plain list is a dataset."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from support import TINY, invoke
from ltm_core import InferenceEngine, Trainer, TrainingArguments
from ltm_core.configuration import compose, model_config
from ltm_core.console import DISTRIBUTED_LOGGER, LIGHTNING_LOGGERS, quiet_lightning
from ltm_core.errors import ConfigError, DataError, LtmError
from ltm_core.model import TitanModel


def _model() -> TitanModel:
    torch.manual_seed(0)
    return TitanModel(model_config(compose(TINY)))


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, seq_len=64, eval_samples=4, eval_steps=5,
                logging_steps=1, progress_bar=False, accelerator="cpu", max_steps=2, warmup_steps=1)
    return TrainingArguments(**{**base, **kw})


def _rows(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (65,), generator=g) for _ in range(n)]


def test_an_eval_mode_model_trains_without_the_eval_mode_warning_and_a_list_is_a_dataset(tmp_path, capfd):
    model = _model().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        last = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=_rows()).train()
    assert last.exists()
    printed = capfd.readouterr()
    text = printed.out + printed.err + "\n".join(str(w.message) for w in caught)
    assert "eval mode" not in text, text


def test_a_list_of_bad_items_or_a_non_sequence_is_refused_in_one_line():
    with pytest.raises(DataError, match="train_dataset must be a path, a map-style"):
        Trainer(model=_model(), args=_args("unused"), train_dataset=iter(_rows()))
    with pytest.raises(DataError, match="train_dataset is empty"):
        Trainer(model=_model(), args=_args("unused"), train_dataset=[])


def test_the_output_dir_message_names_the_python_arguments(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=_rows())
    with pytest.raises(LtmError) as err:
        trainer.train()
    message = str(err.value)
    assert "train(resume_from_checkpoint=True)" in message and "overwrite_output_dir=True" in message, message
    assert "resume=auto" not in message and "overwrite=true" not in message, message


@pytest.mark.parametrize("bad", [-1, -3, 1.5, "2", True])
def test_generate_refuses_a_bad_max_new_tokens(bad):
    engine = InferenceEngine(_model().eval())
    ids = torch.randint(0, 256, (1, 5))
    with pytest.raises(ConfigError, match="max_new_tokens") as err:
        engine.generate(ids, max_new_tokens=bad)
    assert "\n" not in str(err.value)


def test_generate_with_zero_new_tokens_returns_the_prompt():
    ids = torch.randint(0, 256, (1, 5))
    assert torch.equal(InferenceEngine(_model().eval()).generate(ids, max_new_tokens=0), ids)


def test_ddp_banners_and_the_resume_callbacks_warning_are_filtered():
    quiet_lightning()
    for name, message in ((DISTRIBUTED_LOGGER, "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2"),
                          (LIGHTNING_LOGGERS[0], f"{'-' * 100}\ndistributed_backend=gloo\nAll distributed processes "
                                                 f"registered. Starting with 2 processes\n{'-' * 100}\n")):
        record = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
        assert not logging.getLogger(name).filter(record), message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()  # its filters go in front of "always"
        warnings.warn("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be "
                      "provided during `Trainer` instantiation. Please add the following callbacks: ['x'].")
    assert not caught, [str(w.message) for w in caught]


def test_a_resume_at_max_steps_says_there_is_nothing_to_train(tmp_path):
    out = tmp_path / "run"
    first = invoke("train", *TINY, f"output_dir={out}", "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    again = invoke("train", *TINY, f"output_dir={out}", "trainer.max_steps=2", "resume=auto",
                   "trainer.val_check_interval=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert ("note: the checkpoint is at step 2 of trainer.max_steps=2: nothing to train; raise trainer.max_steps "
            "to go on") in again.stdout, again.stdout
    assert "Be aware that when using" not in again.stdout + again.stderr
    assert "note:" not in first.stdout
