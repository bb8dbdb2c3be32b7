"""ltm: Long-Term-Memory Transformers."""

from ltm_core.config import TitanConfig
from ltm_core.inference import InferenceConfig, InferenceEngine
from ltm_core.memory import MemoryState
from ltm_core.model import TitanModel, TitanOutput

__all__ = ["TitanConfig", "TitanModel", "TitanOutput", "MemoryState", "InferenceEngine", "InferenceConfig"]
