"""Config composition and validation: every bad value is one line naming its key."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ltm_core.config import DeltaMemoryConfig, NeuralMemoryConfig, SlotsMemoryConfig, TokensMemoryConfig
from ltm_core.configuration import compose, model_config
from ltm_core.errors import ConfigError


@pytest.mark.parametrize("overrides, key, words", [
    (["model.hiden_size=64"], "model.hiden_size", "unknown key"),
    (["foo=1"], "foo", "unknown key"),
    (["model.hidden_size=abc"], "model.hidden_size", "Integer"),
    (["trainer.max_steps=1.5"], "trainer.max_steps", "Integer"),
    (["model.use_memory=maybe"], "model.use_memory", "valid bool"),
    (["model=huge"], "model", "choose one of base, large, small, tiny"),
    (["precision=fp8"], "precision", "bf16-mixed"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "model.hidden_size", "not divisible"),
    (["model.segment_length=0"], "model.segment_length", "positive"),
    (["model.memory.slots=-1"], "model.memory.slots", "positive"),
    (["model.memory.slots=0"], "model.memory.slots", "positive"),
    (["model.bptt_segments=0"], "model.bptt_segments", "positive"),
    (["model/memory=cross"], "model/memory", "choose one of delta, neural, slots, tokens"),
    (["model.memory.dim=16"], "model.memory.dim", "unknown key"),
    (["model/memory=slots", "model.memory.select_noise=0.5"], "model.memory.select_noise", "unknown key"),
    (["model/memory=delta", "model.memory.heads=2"], "model.memory.heads", "unknown key"),
    (["model.memory.select_noise=-1"], "model.memory.select_noise", ">= 0"),
    (["model.memory.select_dedup=1.5"], "model.memory.select_dedup", "cosine"),
    (["model/memory=slots", "model.memory.heads=3"], "model.memory.heads", "must divide"),
    (["model.memory_read=tokens"], "model.memory_read", "model.memory.*"),
    (["model/memory=neural", "model.memory.placement=mem"], "model.memory.placement", "mac, mag, mal"),
    (["model/memory=neural", "model.memory.depth=3"], "model.memory.depth", "1 (a linear map)"),
    (["model/memory=neural", "model.memory.chunk=0"], "model.memory.chunk", "positive"),
    (["model/memory=neural", "model.memory.lr=0"], "model.memory.lr", "> 0"),
    (["model/memory=neural", "model.memory.persistent=-1"], "model.memory.persistent", ">= 0"),
    (["model/memory=neural", "model.memory.select_noise=0.5"], "model.memory.select_noise", "unknown key"),
    (["model.kernels=cuda"], "model.kernels", "auto, triton, torch"),
    (["model.compile_mode=fast"], "model.compile_mode", "default, reduce-overhead"),
    (["model.compile=true", "model.kernels=triton"], "model.kernels", "model.compile=true"),
    (["data.seq_len=100"], "data.seq_len", "multiple of model.segment_length"),
    (["data=textfile"], "data.path", "required"),
    (["data.batch_size=0"], "data.batch_size", "positive"),
    (["trainer.max_steps=0"], "trainer.max_steps", "positive"),
    (["optim.lr=-1"], "optim.lr", "positive"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps", "0 or more"),
    (["experiment=babi_facts", "model/memory=tokens"], "model.memory.dim",
     "Key 'dim' not in 'TokensMemoryConfig'); see `ltm config show` for the known keys (set by experiment/babi_facts)"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio", "in [0, 1]"),
    (["optim.beta2=1"], "optim.beta2", "in [0, 1)"),
    (["optim.schedule_steps=0"], "optim.schedule_steps", "positive or null"),
    (["optim.grad_clip=nan"], "optim.grad_clip", "0 (off) or more"),
    (["resume=latest"], "resume", "auto or a path"),
    (["model.hidden_size=="], "model.hidden_size", "key=value"),
])
def test_bad_values_name_their_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert message.startswith(f"config error: {key}: "), message
    assert words in message and "\n" not in message


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_needs_its_extra():
    with pytest.raises(ConfigError, match="trainer.tensorboard.*ltm\\[tensorboard\\]"):
        compose(["trainer.tensorboard=true"])


def test_presets_and_overrides_compose():
    base = model_config(compose(["model=base"]))
    assert (base.hidden_size, base.num_attention_heads, base.num_hidden_layers, base.memory.kind,
            base.memory.slots) == (768, 12, 12, "tokens", 512)
    cfg = compose(["model=small", "model.memory.slots=256", "model.use_memory=false", "trainer.max_steps=100",
                   "precision=bf16-mixed", "output_dir=runs/a"])
    small = model_config(cfg)
    assert small.memory.slots == 256 and not small.use_memory and small.hidden_size == 384
    assert cfg.trainer.max_steps == 100 and cfg.precision.lightning == "bf16-mixed" and cfg.output_dir == "runs/a"
    assert small.ffn_dim == 1024  # derived from hidden_size: 8/3 * 384 rounded up to a multiple of 64
    for name in ("tiny", "small", "base", "large"):
        cfg = compose([f"model={name}"])  # every preset is valid with the default data, and uses the tokens memory
        assert cfg.data.seq_len == 4 * cfg.model.segment_length
        model = model_config(cfg)
        assert model.memory_kind == "tokens" and model.short_conv == 4 and model.short_conv_carry
    for name in ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true"):
        compose([f"precision={name}"])


def test_the_memory_kind_is_a_config_group_with_its_own_schema():
    """`model/memory=<kind>` swaps the memory's config (its own dataclass); the preset's slot count stays."""
    slots = model_config(compose(["model=base", "model/memory=slots", "model.memory.dim=32"]))
    assert slots.memory == SlotsMemoryConfig(slots=512, dim=32)
    delta = model_config(compose(["model/memory=delta"]))
    assert delta.memory == DeltaMemoryConfig(slots=64)
    neural = model_config(compose(["model=large", "model/memory=neural", "model.memory.placement=mag"]))
    assert neural.memory == NeuralMemoryConfig(slots=1024, placement="mag")
    assert model_config(compose([])).memory == TokensMemoryConfig(slots=64)


@pytest.mark.parametrize("kind, cls", [("tokens", TokensMemoryConfig), ("slots", SlotsMemoryConfig),
                                       ("delta", DeltaMemoryConfig), ("neural", NeuralMemoryConfig)])
def test_each_memory_yaml_lists_its_dataclass_defaults(kind, cls):
    """conf/model/memory/<kind>.yaml shows every key of its dataclass, with the dataclass's default and a comment."""
    path = Path(__file__).resolve().parents[1] / "conf" / "model" / "memory" / f"{kind}.yaml"
    values = {k: v for k, v in OmegaConf.load(path).items() if k != "defaults"}
    assert values == dataclasses.asdict(cls())
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", " ", "defaults")):
            assert "#" in line or line.startswith("kind:"), line
