"""Configs and checkpoints written before the memory kinds (ltm < 0.2).

Until then the memory was chosen by top-level model keys (`memory_read`, `memory_write`, `memory_slots`, ...).
Three of those combinations are today's kinds and load through this migration:

    memory_read=tokens  memory_write=select   -> model.memory.kind=tokens
    memory_read=cross   memory_write=gated    -> model.memory.kind=slots
    memory_read=cross   memory_write=delta    -> model.memory.kind=delta

Everything else (the importance write, the context read, the select write on compressed slots, and the retired
options such as slot_positions or memory_conv) was retired for lack of a measured benefit
(docs/experiments/negative-results.md): such a config or checkpoint is refused in one line that names the option.
"""

from __future__ import annotations

from typing import Any

from ltm_core.errors import ConfigError

LEGACY_KEYS = ("memory_read", "memory_write", "memory_slots", "memory_dim", "memory_heads", "update_gate_bias",
               "select_noise", "importance_penalty", "importance_relative", "importance_zloss", "importance_detach",
               "select_dedup", "select_grad", "write_from", "slot_positions", "slot_order", "read_importance",
               "read_qk_norm", "memory_conv", "memory_conv_mix")
# the values under which a retired option did nothing
RETIRED = {"importance_relative": False, "importance_zloss": 0.0, "select_grad": "sigmoid", "slot_positions": False,
           "slot_order": "arrival", "read_qk_norm": False, "memory_conv": 0, "memory_conv_mix": "depthwise"}
# the model defaults of ltm < 0.2 that have changed since, for configs that did not store them
LEGACY_DEFAULTS = {"memory_read": "cross", "memory_write": "gated", "memory_slots": 32, "memory_dim": 64,
                   "update_gate_bias": -2.0, "select_noise": 0.5, "importance_penalty": 0.0, "importance_detach": 0.0,
                   "read_importance": False, "write_from": "block", "short_conv": 0, "short_conv_carry": False,
                   "bptt_segments": 2}
# parameter names: the read and its norm moved into the memory module
STATE_RENAMES = ((".memory_norm.", ".memory.read_norm."), (".memory_read.", ".memory.reader."))


def is_legacy(values: dict[str, Any]) -> bool:
    return any(key in values for key in LEGACY_KEYS)


def _refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"model.{key}", f"{value!r} was retired in ltm 0.2 ({why}; docs/experiments/"
                                       "negative-results.md): retrain with model/memory=tokens|slots|delta|neural")


def migrate_model_config(values: dict[str, Any]) -> dict[str, Any]:
    """Model config values -> today's keys (unchanged when they already are). Raises ConfigError for a retired
    memory or option."""
    if not is_legacy(values):
        return values
    old = {**LEGACY_DEFAULTS, **values}
    new = {k: v for k, v in old.items() if k not in LEGACY_KEYS}
    for key, off in RETIRED.items():
        if key in old and old[key] != off:
            raise _refuse(key, old[key], "no measured benefit")
    pair = (old["memory_read"], old["memory_write"])
    if not old.get("use_memory", True):  # a baseline: the memory config is unused
        new["memory"] = {"kind": "tokens"}
    elif pair == ("tokens", "select"):
        detach = old["importance_detach"]
        if detach not in (0, 1, True, False):
            raise _refuse("importance_detach", detach, "only 0 and 1 are kept, as true/false")
        new["memory"] = {"kind": "tokens", "slots": old["memory_slots"], "select_noise": old["select_noise"],
                         "importance_penalty": old["importance_penalty"], "importance_detach": bool(detach),
                         "select_dedup": old.get("select_dedup"), "read_importance": old["read_importance"]}
    elif pair == ("cross", "gated"):
        if old["write_from"] != "block":
            raise _refuse("write_from", old["write_from"], "the slots memory writes the block output")
        new["memory"] = {"kind": "slots", "slots": old["memory_slots"], "dim": old["memory_dim"],
                         "heads": old.get("memory_heads"), "update_gate_bias": old["update_gate_bias"]}
    elif pair == ("cross", "delta"):
        if old["write_from"] != "attention":
            raise _refuse("write_from", old["write_from"], "the delta memory writes the state after attention")
        new["memory"] = {"kind": "delta", "slots": old["memory_slots"], "dim": old["memory_dim"]}
    else:
        key = "memory_write" if pair[1] != "select" else "memory_read"
        raise _refuse(key, old[key], f"memory_read={pair[0]} with memory_write={pair[1]} is not a memory kind")
    return new


def migrate_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Parameter names of a legacy checkpoint -> today's."""
    out = {}
    for name, value in state.items():
        for old, new in STATE_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    return out


# neural memory options added after checkpoints were written with it, and the value those checkpoints computed with
# (the dataclass default may differ: a stored config that lacks the key must keep the function it was trained with)
NEURAL_STORED_DEFAULTS = {"normalize_values": False}


def complete_stored_config(values: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config (today's keys) with the options it predates set to what it was trained with:
    a neural memory stored without `normalize_values` was trained with free values."""
    memory = values.get("memory")
    if not isinstance(memory, dict) or memory.get("kind") != "neural":
        return values
    return {**values, "memory": {**NEURAL_STORED_DEFAULTS, **memory}}
