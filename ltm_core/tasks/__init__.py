"""Long-context tasks, generated on the fly from a seed: usable as training data (`data=<task>`) and as
evaluation (`ltm eval task=<task>`).

    passkey      needle in a haystack: recall a 5-digit key hidden at any depth (ltm_core.tasks.passkey)
    mqar         multi-query associative recall across segments: the capacity curve (ltm_core.tasks.mqar)
    babi_facts   bAbI qa1 facts in KJV text, later facts overriding earlier ones (ltm_core.tasks.babi_facts)
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ltm_core.config import DataConfig, TaskConfig, TitanConfig
from ltm_core.errors import ConfigError
from ltm_core.tasks.babi_facts import BabiFactsTask
from ltm_core.tasks.mqar import MqarTask
from ltm_core.tasks.passkey import PasskeyTask

TASKS = {task.name: task for task in (PasskeyTask(), MqarTask(), BabiFactsTask())}


def is_task(name: str | None) -> bool:
    return name in TASKS


def get_task(name: str | None):
    if name not in TASKS:
        raise ConfigError("task", f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def validate_task(cfg: DictConfig, model: TitanConfig, data: DataConfig) -> None:
    """Check `cfg.task` and, when the run trains on a task, that it is the same task and fits data.seq_len."""
    task_cfg = TaskConfig(**OmegaConf.to_container(cfg.task, resolve=True))
    if task_cfg.name is None and is_task(data.name):
        raise ConfigError("task", f"data={data.name} needs task={data.name} (the data config selects it)")
    task_cfg.validate()
    if is_task(data.name):
        if task_cfg.name != data.name:
            raise ConfigError("task", f"data={data.name} trains on task={data.name}, got task={task_cfg.name}")
        need = get_task(data.name).min_length(task_cfg, task_cfg.layout(model.segment_length))
        if data.seq_len + 1 < need:
            raise ConfigError("data.seq_len", f"{data.seq_len} is too short for task {data.name} with these "
                              f"settings (a sample needs {need} tokens)")


__all__ = ["TASKS", "get_task", "is_task", "validate_task"]
