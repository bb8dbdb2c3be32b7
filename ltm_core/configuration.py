"""Hydra composition of the config tree in `conf/` (package `ltm_conf`), with one-line errors.

`compose(overrides)` is what the CLI and Python users call to build a run config; every failure (unknown key,
wrong type, unknown group option, invalid value) becomes a `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ltm_core.config import (MEMORY_CONFIGS, TASK_NAMES, DataConfig, OptimConfig, TitanConfig, TrainRunConfig,
                             text_files)
from ltm_core.errors import CheckpointError, ConfigError, LtmError
from ltm_core.migration import LEGACY_KEYS


def _register_schemas() -> None:
    """The run schema, with `model.memory` left open: each memory kind's option file (conf/model/memory/<kind>.yaml)
    starts from its own dataclass (`<kind>_schema`), so a key of another kind is unknown there."""
    store = ConfigStore.instance()
    schema = OmegaConf.structured(TrainRunConfig)
    with open_dict(schema.model):
        del schema.model["memory"]
        schema.model.memory = None
    store.store(name="train_schema", node=schema)
    for kind, cls in MEMORY_CONFIGS.items():
        store.store(group="model/memory", name=f"{kind}_schema", node=cls)


_register_schemas()


def config_dir() -> str:
    return str(resources.files("ltm_conf"))


def _first(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def config_error(exc: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf exception (and its causes) into one line naming the key."""
    text = str(exc)
    if isinstance(exc, MissingConfigException) or "Could not find" in text or "Could not load" in text:
        path = _first(r"Could not (?:find|load) '([^']+)'", text)
        options = [o for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if not o.endswith("_schema")]
        if path and "/" in path:
            group, option = path.rsplit("/", 1)
            choices = f"; choose one of {', '.join(options)}" if options else ""
            return ConfigError(group, f"no option {option!r}{choices}")
    while exc.__cause__ is not None:  # the innermost error says what is wrong
        exc = exc.__cause__
        text = str(exc)
    key = _first(r"full_key: (\S+)", text) or _first(r"override '([^'=]+)", text) or "overrides"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    message = lines[0] if lines else type(exc).__name__
    where = None
    if message.endswith(":") and len(lines) > 1:  # "In 'experiment/x': ... raised while composing config:", then why
        where, message = _first(r"In '([^']+)'", message), lines[1]
    if re.match(r"Key '[^']+' not in", message):
        moved = key.startswith("model.") and key.split(".")[1] in LEGACY_KEYS
        hint = ("the memory's keys are under model.memory.* since ltm 0.2 (model/memory=tokens|slots|delta|neural)"
                if moved else "see `ltm config show` for the known keys")
        message = f"unknown key ({message}); {hint}"
    elif message.startswith("Error parsing override"):
        message = message + " (expected key=value)"
    if where:
        message += f" (set by {where})"
    return ConfigError(key, message)


def _sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """Expand sweep overrides (a=1,2 b=x,y) into the list of their combinations, as Hydra's basic sweeper does."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    combos: list[list[str]] = [[]]
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            values = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            values = [override.input_line]
        combos = [c + [v] for c in combos for v in values]
    return combos


def compose(overrides: Iterable[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides and validate it. Raises ConfigError."""
    overrides = list(overrides)
    check_memory_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise config_error(exc) from None
    finally:
        GlobalHydra.instance().clear()
    check_additions(cfg, overrides)
    check_memory_kind(cfg, overrides)
    fill_derived(cfg)
    validate(cfg)
    return cfg


def _split(override: str) -> tuple[str, str, str | None]:
    """`++a.b=v` -> ("++", "a.b", "v"); the value is None without `=`."""
    body = override.lstrip("+~")
    key, _, value = body.partition("=")
    return override[:len(override) - len(body)], key.strip(), value.strip() if "=" in body else None


def check_memory_overrides(overrides: list[str]) -> None:
    """`model.memory=null` (the model would train with the default tokens memory while config.yaml says null)."""
    for override in overrides:
        prefix, key, value = _split(override)
        if key == "model.memory" and "~" not in prefix and value is not None and value.lower() in ("null", "~"):
            raise ConfigError("model.memory", "cannot be null: for no memory use model.use_memory=false, for "
                                              f"another kind model/memory={'|'.join(MEMORY_CONFIGS)}")


def check_memory_kind(cfg: DictConfig, overrides: list[str]) -> None:
    """`model.memory.kind=X` changes the name, not the memory's keys: the kind is the option of group model/memory."""
    given = [v for o in overrides for p, k, v in [_split(o)] if k == "model.memory.kind" and "~" not in p]
    memory = cfg.model.get("memory") if isinstance(cfg.get("model"), DictConfig) else None
    if not given or not isinstance(memory, DictConfig):
        return
    kind = memory.get("kind")
    if kind not in MEMORY_CONFIGS or OmegaConf.get_type(memory) is not MEMORY_CONFIGS[kind]:
        if given[-1] in MEMORY_CONFIGS:
            raise ConfigError("model.memory.kind", f"change the memory kind with model/memory={given[-1]} "
                                                   "(model.memory.kind renames the kind and keeps the other keys)")
        raise ConfigError("model.memory.kind", f"choose the memory with model/memory=KIND "
                                               f"({'|'.join(MEMORY_CONFIGS)}), got {given[-1]!r}")


def check_additions(cfg: DictConfig, overrides: list[str]) -> None:
    """`+key=value` / `++key=value` add a key where the schema has none; Hydra accepts any, so a misspelt key would
    be added silently. A key must be one the schema knows (Hydra's own hydra.* keys and config groups aside)."""
    for override in overrides:
        prefix, key, _ = _split(override)
        if "+" not in prefix or not key or "/" in key or key.split(".")[0] == "hydra" or "@" in key:
            continue
        if (Path(config_dir()) / key.replace(".", "/")).is_dir():  # +group=option
            continue
        node: Any = cfg
        for part in key.split("."):
            kind = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
            if kind is None or not dataclasses.is_dataclass(kind):
                break  # a free-form dict (or a value): Hydra checks the rest
            if part not in {f.name for f in dataclasses.fields(kind)}:
                moved = key.startswith("model.") and key.split(".")[1] in LEGACY_KEYS
                hint = ("the memory's keys are under model.memory.* since ltm 0.2 (model/memory=tokens|slots|delta|"
                        "neural)" if moved else "see `ltm config show` for the known keys")
                raise ConfigError(key, f"unknown key (Key '{part}' not in '{kind.__name__}'); {hint}")
            node = node.get(part)


def fill_derived(cfg: DictConfig) -> None:
    """Values that default to a function of others: data.seq_len (null -> 4 segments of the model)."""
    if cfg.data.seq_len is None and isinstance(cfg.model.segment_length, int):
        cfg.data.seq_len = 4 * cfg.model.segment_length


def override_key(override: str) -> str:
    """The key a command-line override sets: `++trainer.max_steps=5` -> `trainer.max_steps`."""
    return override.split("=", 1)[0].lstrip("+~")


def validate_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Compose and check every job an `ltm train [-m] overrides` command would run, before any of them starts: its
    config, then the files it reads (`check_inputs`). A sweep's error names its job (`job 1 (data.path=b.txt): ...`),
    by its number and the overrides that differ between jobs. Returns the keys the sweep varies, which name a job in
    the lines of a running sweep as well ([] for a single run)."""
    try:
        combos = _sweep_combinations(overrides) if multirun else [overrides]
    except HydraException as exc:
        raise config_error(exc) from None
    keys = [override_key(o) for o in combos[0]]  # one per override, in every combination
    swept = [k for i, k in enumerate(keys) if len({c[i] for c in combos}) > 1]
    for num, combo in enumerate(combos):
        try:
            check_inputs(compose(combo))
        except LtmError as err:
            if swept:
                err.args = (f"{job_name(num, combo, swept)}: {err}; no job was started",)
            raise
    return swept


def job_name(num: int, overrides: Iterable[str], swept: Iterable[str]) -> str:
    """`job 1 (optim.lr=0.001)`: a sweep job's number and its values of the swept keys."""
    swept = set(swept)
    values = " ".join(o for o in overrides if override_key(o) in swept)
    return f"job {num} ({values})" if values else f"job {num}"


def check_inputs(cfg: DictConfig) -> None:
    """The files a run reads, checked before a run or sweep starts (a sweep does not stop at its job 3 for a
    misspelt file name once jobs 0-2 have trained): data.path of data=textfile and resume=PATH exist, with the
    messages of the checks where they are read (`ltm_core.data`, `ltm_core.train.check_resume`), which check again
    and read them."""
    if cfg.data.name == "textfile" and cfg.data.path:
        text_files(Path(cfg.data.path).expanduser().resolve())
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():  # (a folder: check_resume says which file)
        raise CheckpointError(f"checkpoint error: resume={cfg.resume} does not exist")


def validate(cfg: DictConfig) -> None:
    """Check values that types cannot: the model config, and how the data fits the model."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None
    model = model_config(cfg)
    fill_derived(cfg)
    data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    if data.name == "textfile" and not data.path:
        raise ConfigError("data.path", "is required with data=textfile (a .txt/.jsonl file or a folder)")
    if data.seq_len <= 0:
        raise ConfigError("data.seq_len", f"must be positive, got {data.seq_len}")
    if data.batch_size <= 0:
        raise ConfigError("data.batch_size", f"must be positive, got {data.batch_size}")
    if data.seq_len % model.segment_length:
        raise ConfigError("data.seq_len", f"{data.seq_len} must be a multiple of model.segment_length="
                          f"{model.segment_length}")
    # --- long-context tasks (ltm_core.tasks): task keys in range, data=<task> trains on task=<task>
    if cfg.task.name is not None or data.name in TASK_NAMES:
        from ltm_core.tasks import validate_task

        validate_task(cfg, model, data)
    for key in ("max_steps", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps", "max_bad_steps"):
        if cfg.trainer[key] <= 0:
            raise ConfigError(f"trainer.{key}", f"must be positive, got {cfg.trainer[key]}")
    minutes = cfg.trainer.checkpoint_every_minutes
    if minutes is not None and not minutes >= 0:  # also refuses nan
        raise ConfigError("trainer.checkpoint_every_minutes", f"must be 0 (off) or more, got {minutes}")
    if cfg.trainer.save_every_n_steps is not None and cfg.trainer.save_every_n_steps <= 0:
        raise ConfigError("trainer.save_every_n_steps", f"must be positive or null, got {cfg.trainer.save_every_n_steps}")
    if cfg.trainer.save_every_n_steps is not None:
        from ltm_core.parallel.layout import uses_native

        if uses_native(cfg):
            raise ConfigError("trainer.save_every_n_steps", "the native parallel loop saves at each validation: "
                                                            "leave it null and set trainer.val_check_interval")
    if cfg.trainer.tensorboard and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError("trainer.tensorboard", "needs TensorBoard: pip install 'ltm[tensorboard]'")
    if cfg.resume not in (None, "auto") and not str(cfg.resume).endswith(".ckpt"):
        raise ConfigError("resume", f"must be auto or a path to a .ckpt file, got {cfg.resume!r}")
    # --- parallel layout (ltm_core.parallel): dp × tp × pp vs world size, heads vs tp, layers vs stages
    from ltm_core.parallel.layout import validate_parallel

    validate_parallel(cfg, model, data)


def model_config(cfg: DictConfig | dict[str, Any]) -> TitanConfig:
    model = cfg["model"]
    values = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    return TitanConfig.from_dict(values)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
