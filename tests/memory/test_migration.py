"""Checkpoints and configs of ltm < 0.2 (the memory chosen by top-level keys): the kinds that still exist load
through a key migration and compute what they computed; a retired memory is refused in one line.

tests/data/legacy/*.ckpt were written by the code of commit a2928ad (tests/data/legacy/make_legacy.py), with the
logits that code computed; neural_free_values.ckpt by the neural memory's code before `normalize_values` existed
(make_neural_free_values.py): options added since a checkpoint was written take the value it was trained with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ltm_cli.app import app
from ltm_core.checkpoint import load_model, read_checkpoint
from ltm_core.config import TitanConfig
from ltm_core.configuration import compose
from ltm_core.errors import CheckpointError, ConfigError

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"


@pytest.mark.parametrize("kind", ["tokens", "slots", "delta"])
def test_a_legacy_checkpoint_loads_and_computes_what_it_computed(kind):
    model = load_model(LEGACY / f"{kind}.ckpt")
    assert model.config.memory.kind == kind
    expected = torch.load(LEGACY / f"{kind}_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits[..., :32]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_the_migrated_tokens_config_keeps_every_option():
    model = load_model(LEGACY / "tokens.ckpt")
    memory = model.config.memory
    assert (memory.slots, memory.select_dedup, memory.read_importance, memory.importance_penalty,
            memory.importance_detach) == (8, 0.97, True, 1.0, True)
    assert model.config.short_conv == 4 and model.config.short_conv_carry


def test_a_retired_memory_is_refused_in_one_line():
    ckpt = read_checkpoint(LEGACY / "importance.ckpt")
    with pytest.raises(CheckpointError, match=r"importance.ckpt was trained with model.memory_write: 'importance' "
                                              r"was retired in ltm 0.2"):
        load_model(LEGACY / "importance.ckpt", ckpt=ckpt)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(LEGACY / "importance.ckpt")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "retired" in lines[0] and "negative-results.md" in lines[0]


@pytest.mark.parametrize("legacy, key", [
    (dict(memory_read="cross", memory_write="select"), "model.memory_read"),
    (dict(memory_read="context", memory_write="gated"), "model.memory_write"),
    (dict(memory_read="cross", memory_write="gated", slot_positions=True), "model.slot_positions"),
    (dict(memory_read="cross", memory_write="gated", memory_conv=4), "model.memory_conv"),
    (dict(memory_read="tokens", memory_write="select", importance_detach=0.5), "model.importance_detach"),
    (dict(memory_read="cross", memory_write="delta", write_from="block"), "model.write_from"),
])
def test_legacy_configs_with_a_retired_option_name_it(legacy, key):
    with pytest.raises(ConfigError) as err:
        TitanConfig.from_dict({"hidden_size": 32, "num_attention_heads": 2, **legacy})
    assert err.value.key == key and "retired" in str(err.value)


def test_a_legacy_override_says_where_the_key_went():
    with pytest.raises(ConfigError, match=r"model.memory_slots: unknown key .*under model.memory"):
        compose(["model.memory_slots=16"])


def test_a_neural_checkpoint_from_before_normalize_values_computes_what_it_computed():
    """Its values were free: loaded with today's default (unit values) the same weights compute another function,
    which is how a passkey checkpoint with validation answer loss 1e-9 once scored 0 exact matches."""
    model = load_model(LEGACY / "neural_free_values.ckpt")
    assert model.config.memory.kind == "neural" and model.config.memory.normalize_values is False
    expected = torch.load(LEGACY / "neural_free_values_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits[..., :32]
        unit = load_model(LEGACY / "neural_free_values.ckpt", ["model.memory.normalize_values=true"])
        unit_logits = unit(expected["input_ids"]).logits[..., :32]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert (unit_logits - expected["logits"]).abs().max() > 1e-2  # the option matters for these weights


def test_a_neural_run_from_before_normalize_values_resumes_with_free_values(tmp_path):
    from omegaconf import OmegaConf

    from ltm_core.train import _saved_model_config

    saved = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create(read_checkpoint(LEGACY / "neural_free_values.ckpt")["hyper_parameters"]["config"]),
                   saved)
    assert _saved_model_config(saved).memory.normalize_values is False


def test_a_new_neural_config_stores_normalize_values_and_keeps_it():
    from ltm_core.checkpoint import stored_model_config
    from ltm_core.configuration import to_dict

    model = to_dict(compose(["model/memory=neural"]))["model"]
    assert model["memory"]["normalize_values"] is True
    ckpt = {"hyper_parameters": {"config": {"model": model}}}
    assert stored_model_config(ckpt)["memory"]["normalize_values"] is True
