"""Wrong keys and values of the config are one line and exit code 2, before anything runs: `+`/`++` additions of
keys the schema does not have, `model.memory=null`, `model.memory.kind=X`, non-model overrides of `ltm bench
model`, and `ltm config show -m`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ltm_cli.app import app
from ltm_core.configuration import compose
from ltm_core.errors import ConfigError


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("override, key, where", [
    ("+trainer.max_stepz=5", "trainer.max_stepz", "TrainerConfig"),
    ("++trainer.max_stepz=5", "trainer.max_stepz", "TrainerConfig"),
    ("+foo=1", "foo", "TrainRunConfig"),
    ("++model.memory.foo=1", "model.memory.foo", "TokensMemoryConfig"),
])
def test_additions_of_unknown_keys_are_refused_as_unknown_keys(override, key, where):
    line = _one_line_error(["config", "show", override])
    assert f"config error: {key}: unknown key (Key '{key.rsplit('.', 1)[-1]}' not in '{where}')" in line
    plain = _one_line_error(["config", "show", override.lstrip("+")]) if key != "model.memory.foo" else line
    assert plain.split(";")[0] == line.split(";")[0]  # the same words as without `+`


def test_legitimate_additions_still_compose():
    assert compose(["++output_dir=x"]).output_dir == "x"
    assert compose(["++trainer.max_steps=7"]).trainer.max_steps == 7
    assert compose(["+hydra.job.name=x", "++hydra.job.chdir=false"]).trainer.max_steps > 0
    assert compose(["model/memory=delta", "++model.memory.slots=16"]).model.memory.slots == 16


def test_train_refuses_an_unknown_addition_before_training(tmp_path):
    line = _one_line_error(["train", "+foo=1", "trainer.max_steps=1", f"output_dir={tmp_path / 'run'}"])
    assert "foo: unknown key" in line and not (tmp_path / "run").exists()


def test_memory_null_is_refused():
    line = _one_line_error(["config", "show", "model.memory=null"])
    assert "model.memory: cannot be null" in line and "model.use_memory=false" in line and "model/memory=" in line
    with pytest.raises(ConfigError, match="model.memory: cannot be null"):
        compose(["model.memory=null"])


def test_memory_kind_is_changed_with_the_group():
    line = _one_line_error(["config", "show", "model.memory.kind=delta"])
    assert "model.memory.kind:" in line and "model/memory=delta" in line and "importance_detach" not in line
    assert "model/memory=KIND" in _one_line_error(["config", "show", "model.memory.kind=nope"])
    assert compose(["model/memory=delta", "model.memory.kind=delta"]).model.memory.kind == "delta"  # a no-op


@pytest.mark.parametrize("override", ["data.seq_len=128", "+foo=1", "trainer.max_steps=3"])
def test_bench_model_takes_model_overrides_only(override):
    small = ["--context", "64", "--repeats", "1", "--warmup", "0", "--variant", "full_causal", "--device", "cpu"]
    line = _one_line_error(["bench", "model", *small, override])
    assert f"{override.lstrip('+').split('=')[0]}: ltm bench model takes model.* overrides only" in line


def test_bench_model_checks_its_model_overrides():
    assert "model.nope: unknown key" in _one_line_error(["bench", "model", "model.nope=1"])


@pytest.mark.parametrize("flag", ["-m", "--multirun"])
def test_config_show_says_sweeps_are_for_train(flag):
    line = _one_line_error(["config", "show", flag, "model=tiny,small"])
    assert "ltm train -m" in line and "LexerNoViableAlt" not in line
