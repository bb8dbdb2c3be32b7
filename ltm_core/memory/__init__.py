"""The long-term memory: one interface (`base.Memory`), one module per kind.

    tokens   the M most important whole tokens, read by the self-attention (the default)   tokens.py
    slots    the seed design: compressed slots, gated write, cross-attention read            slots.py
    delta    an associative linear map written with the delta rule                           delta.py
    neural   Titans' neural memory: an MLP written by gradient steps (mac | mag | mal)        neural.py

`build_memory(cfg)` makes a layer's memory for `cfg.memory.kind`.
"""

from __future__ import annotations

from ltm_core.config import TitanConfig
from ltm_core.memory.base import Memory, Prefix, Scan, Write
from ltm_core.memory.delta import DeltaMemory
from ltm_core.memory.neural import NeuralMemory
from ltm_core.memory.slots import SlotsMemory
from ltm_core.memory.state import LayerState, MemoryState, map_state, stack_states
from ltm_core.memory.tokens import TokensMemory

KINDS: dict[str, type[Memory]] = {"tokens": TokensMemory, "slots": SlotsMemory, "delta": DeltaMemory,
                                  "neural": NeuralMemory}


def build_memory(cfg: TitanConfig) -> Memory:
    return KINDS[cfg.memory.kind](cfg)


__all__ = ["KINDS", "Memory", "Write", "Prefix", "Scan", "LayerState", "MemoryState", "build_memory", "map_state",
           "stack_states"]
