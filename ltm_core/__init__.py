"""ltm: Long-Term-Memory Transformers.

The names below are imported on first use, so that `import ltm_core.configuration` (config composition and
validation) does not pay for torch: a mistyped override answers before torch or Lightning load.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"TitanConfig": "ltm_core.config", "TitanModel": "ltm_core.model", "TitanOutput": "ltm_core.model",
          "MemoryState": "ltm_core.memory", "InferenceEngine": "ltm_core.inference",
          "InferenceConfig": "ltm_core.inference", "Trainer": "ltm_core.trainer",
          "TrainingArguments": "ltm_core.trainer"}

__all__ = ["TitanConfig", "TitanModel", "TitanOutput", "MemoryState", "InferenceEngine", "InferenceConfig", "Trainer",
           "TrainingArguments"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ltm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
