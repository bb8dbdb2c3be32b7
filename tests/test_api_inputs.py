"""Bad input to the Python API is one line (an LtmError) naming what is wrong: every Trainer dataset item as it is
drawn, the ids InferenceEngine and TitanModel read, InferenceConfig's fields, `ltm generate --seed`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support import TINY, invoke, kind_config, one_error_line, tiny_model
from ltm_core import InferenceEngine, Trainer, TrainingArguments
from ltm_core.checkpoint import read_checkpoint
from ltm_core.configuration import compose, model_config
from ltm_core.errors import ConfigError, DataError, LtmError
from ltm_core.inference import InferenceConfig
from ltm_core.model import TitanModel
from ltm_core.trainer import DatasetItemError, ItemCheck


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def _rows(n: int, length: int = 65, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g) for _ in range(n)]


def _model() -> TitanModel:
    torch.manual_seed(0)
    return TitanModel(model_config(compose(TINY)))


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, warmup_steps=1, eval_steps=100,
                logging_steps=1, progress_bar=False, accelerator="cpu")
    return TrainingArguments(**{**base, **kw})


def _train(tmp_path, rows, **kw):
    out = tmp_path / "run"
    return out, Trainer(_model(), _args(out, **kw), Rows(rows)).train()


# ------------------------------------------------------------------------------------------------ Trainer items
def test_item_check_names_the_item_and_what_is_wrong():
    check = ItemCheck("train_dataset", 259, 64)
    inputs, labels = check(3, torch.arange(65, dtype=torch.int32))
    assert inputs.dtype == labels.dtype == torch.long and torch.equal(labels, torch.arange(1, 65))
    cases = [
        (torch.rand(65) * 255, r"^data error: train_dataset\[5\] holds float32 values, not integer token ids"),
        (np.zeros(65, dtype=np.float64), r"train_dataset\[5\] holds float64 values"),
        ([1.5] * 65, r"train_dataset\[5\] holds float32 values"),
        (torch.zeros(65, dtype=torch.bool), r"train_dataset\[5\] holds bool values"),
        (torch.zeros(2, 65, dtype=torch.long), r"train_dataset\[5\] must be a 1-D tensor .* got shape \(2, 65\)$"),
        (torch.zeros(64, dtype=torch.long), r"train_dataset\[5\] has 64 ids, train_dataset\[0\] has 65: every item "
                                            r"must have the same length$"),
        (torch.full((65,), 300), r"train_dataset\[5\] holds token ids outside \[0, 259\): min 300, max 300$"),
        (torch.full((65,), -1), r"outside \[0, 259\): min -1, max -1$"),
        ((torch.zeros(64, dtype=torch.long), torch.full((64,), 999)),
         r"train_dataset\[5\] holds labels outside \[0, 259\) that are not -100 \(no loss\): min 999, max 999$"),
        ((torch.zeros(64, dtype=torch.long), torch.zeros(63, dtype=torch.long)),
         r"got input_ids \(64,\), labels \(63,\)$"),
        ((torch.zeros(64), torch.zeros(64, dtype=torch.long)), r"train_dataset\[5\]'s input_ids holds float32 values"),
        ("text", r"train_dataset\[5\] is not a tensor of token ids"),
    ]
    for item, message in cases:
        with pytest.raises(DatasetItemError, match=message) as err:
            check(5, item)
        assert "\n" not in str(err.value) and isinstance(err.value, DataError)
    pair = check(5, (torch.zeros(64, dtype=torch.long), torch.full((64,), -100)))  # -100: no loss
    assert torch.equal(pair[1], torch.full((64,), -100))


def test_item_zero_fails_in_the_constructor_with_its_real_shape(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"train_dataset\[0\] must be a 1-D .* got shape \(2, 65\)$"):
        Trainer(_model(), _args(out), Rows([torch.zeros(2, 65, dtype=torch.long)] * 2))
    with pytest.raises(DataError, match=r"train_dataset\[0\] holds float32 values"):
        Trainer(_model(), _args(out), Rows([torch.rand(65) * 255 for _ in range(4)]))
    with pytest.raises(DataError, match=r"eval_dataset\[0\] holds token ids outside"):
        Trainer(_model(), _args(out), Rows(_rows(4)), Rows([torch.full((65,), 300)]))
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_later_item_is_one_line_and_leaves_no_folder(tmp_path, workers):
    """Item 1 ragged / out of the vocabulary / floats: one line naming it (also from DataLoader workers, whose
    re-raise would carry the worker's traceback), before any checkpoint: the folder is left as it was (none)."""
    for bad, message in ((_rows(1, 64)[0], r"train_dataset\[1\] has 64 ids, train_dataset\[0\] has 65"),
                         (torch.full((65,), 300), r"train_dataset\[1\] holds token ids outside \[0, 259\)"),
                         (torch.rand(65) * 255, r"train_dataset\[1\] holds float32 values")):
        rows = _rows(4)
        rows[1] = bad
        with pytest.raises(DataError, match=f"^data error: {message}") as err:
            _train(tmp_path, rows, dataloader_num_workers=workers)
        assert "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "run").exists()


def test_a_bad_item_after_a_checkpoint_keeps_the_run(tmp_path):
    """A bad item drawn at step 6 of a run that saved at steps 2 and 4: one line, and the run's checkpoint stays."""
    n = 12
    order = np.random.default_rng([42, 0]).permutation(n)  # epoch 0 of DatasetStream (seed 42)
    rows = _rows(n)
    bad = int(order[10])  # the 11th item drawn: batch 6
    rows[bad] = torch.full((65,), 500)
    with pytest.raises(DataError, match=rf"^data error: train_dataset\[{bad}\] holds token ids outside"):
        _train(tmp_path, rows, max_steps=8, save_steps=2)
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_a_bad_validation_item_is_one_line(tmp_path):
    """Found at the first validation (step 2), after the run saved that step: its checkpoint stays."""
    evals = _rows(4, seed=1)
    evals[2] = torch.full((65,), 300)
    with pytest.raises(DataError, match=r"^data error: eval_dataset\[2\] holds token ids outside"):
        Trainer(_model(), _args(tmp_path / "run", eval_steps=2), Rows(_rows(4)), Rows(evals)).train()
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


# ------------------------------------------------------------------------------------- model and engine inputs
@pytest.fixture(scope="module")
def model():
    return tiny_model(kind_config("tokens")).eval()


def test_bad_ids_are_one_line_in_the_engine_and_the_model(model):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    engine = InferenceEngine(model, InferenceConfig(temperature=0))
    cases = [(ids.float(), r"^data error: input_ids must hold integer token ids \(torch.long\), got torch.float32$"),
             (ids + 300, r"^data error: input_ids holds token ids outside the vocabulary \[0, 259\): min 3\d\d, max"),
             (ids - 256, r"outside the vocabulary \[0, 259\): min -\d+, max -\d+$"),
             (ids[0], r"^data error: input_ids must be 2-D \[batch, tokens\], got shape \(10,\); for one sequence "
                      r"pass ids.unsqueeze\(0\)$"),
             (ids[:, :0], r"input_ids must hold at least one token per row, got shape \(2, 0\)$")]
    for bad, message in cases:
        with pytest.raises(DataError, match=message):
            engine.generate(bad, 3)
        with pytest.raises(DataError, match=message):
            engine.stream(bad, 3)  # at the call, before the first token is asked for
    for bad, message in cases[:4]:
        with pytest.raises(DataError, match=message):
            model(bad)
    with pytest.raises(ValueError):  # as the engine's shape check raised before
        engine.generate(ids[0], 3)
    assert engine.generate(ids.int(), 2).shape == (2, 12)  # int32 ids are ids


def test_the_forward_check_is_skipped_while_exporting_and_compiling(model, monkeypatch):
    import ltm_core.model as model_module

    calls = []
    check = model_module.check_input_ids
    monkeypatch.setattr(model_module, "check_input_ids", lambda *a, **k: calls.append(1) or check(*a, **k))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)
    assert calls == [1]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids).logits

    calls.clear()
    with torch.no_grad():
        exported = torch.export.export(Logits(), (ids,))
    assert calls == []
    torch.testing.assert_close(exported.module()(ids), model(ids).logits)


# ----------------------------------------------------------------------------------------------- InferenceConfig
def test_inference_config_values_are_one_line():
    cases = [(dict(temperature=math.nan), r"^config error: temperature: must be a finite number >= 0 \(0: greedy\), "
                                          r"got nan$"),
             (dict(temperature=math.inf), "temperature: .* got inf$"),
             (dict(temperature=-1.0), "temperature: .* got -1.0$"),
             (dict(seed=99999999999999999999999), r"^config error: seed: must be an integer from -2\*\*63 to 2\*\*64 "
                                                  r"- 1 \(torch's seed range\), got 99999999999999999999999$"),
             (dict(seed=-2 ** 63 - 1), "seed: must be an integer"),
             (dict(seed=1.5), r"seed: .* got 1.5$"),
             (dict(top_p=math.nan), "top_p: must be in"),
             (dict(max_sequence_length=0), "max_sequence_length: must be positive")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            InferenceConfig(**kwargs)
        with pytest.raises(ValueError):  # what these raised before
            InferenceConfig(**kwargs)
    for seed in (0, 2 ** 64 - 1, -2 ** 63, np.int64(7)):
        InferenceConfig(seed=seed)
        torch.Generator().manual_seed(int(seed))


def test_generate_seed_out_of_range_is_one_line_before_the_prompt(tmp_path):
    last = Trainer(_model(), _args(tmp_path / "run", max_steps=1), Rows(_rows(2))).train()
    result = invoke("generate", "--checkpoint", str(last), "--prompt", "Hello", "--seed", "99999999999999999999999")
    one_error_line(SimpleNamespace(returncode=result.returncode, stderr=result.output),  # the runner mixes the streams
                   "seed: must be an integer from -2**63 to 2**64 - 1", "99999999999999999999999")
    assert "Hello" not in result.output
    ok = invoke("generate", "--checkpoint", str(last), "--prompt", "Hello", "--seed", "3", "-n", "2")
    assert ok.returncode == 0 and ok.output.startswith("Hello"), ok.output
    assert isinstance(DatasetItemError("x"), LtmError)
