"""ltm: Long-Term-Memory Transformers."""

from ltm_core.config import TitanConfig
from ltm_core.inference import InferenceConfig, InferenceEngine
from ltm_core.memory import MemoryState
from ltm_core.model import TitanModel, TitanOutput

__all__ = ["TitanConfig", "TitanModel", "TitanOutput", "MemoryState", "InferenceEngine", "InferenceConfig", "Trainer",
           "TrainingArguments"]


def __getattr__(name: str):
    """`Trainer` and `TrainingArguments` import Lightning: loaded on first use, so `import ltm_core` stays light."""
    if name in ("Trainer", "TrainingArguments"):
        from ltm_core import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ltm_core' has no attribute {name!r}")
