"""Loading checkpoints for inference and evaluation, with one-line errors.

The checkpoint format is Lightning's `.ckpt` (written by `ltm train`): the resolved run config is kept under
`hyper_parameters["config"]`, the weights under `state_dict` with the prefix `model.`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ltm_core.config import TitanConfig
from ltm_core.configuration import config_error
from ltm_core.errors import CheckpointError, ConfigError
from ltm_core.migration import is_legacy, migrate_model_config, migrate_state_dict
from ltm_core.model import TitanModel


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint error: {path} is a folder: give the .ckpt file (e.g. "
                              f"{path / 'checkpoints' / 'last.ckpt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint error: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle means the file is not a usable checkpoint
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(f"checkpoint error: {path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"checkpoint error: {path} is not an ltm checkpoint (no state_dict/config)")
    return ckpt


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of an error message, cut at a word boundary (with "...") when longer than `limit`."""
    line = text.strip().split("\n")[0] if text.strip() else ""
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + "..."


def checkpoint_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ckpt["hyper_parameters"]["config"]


def stored_model_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The model config a checkpoint was trained with, in today's keys (a checkpoint of ltm < 0.2 is migrated;
    one that used a retired memory is refused in one line)."""
    try:
        return migrate_model_config(dict(checkpoint_config(ckpt)["model"]))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint error: {path} was trained with {err.key}: "
                              f"{str(err).split(': ', 2)[-1]}") from None


def apply_model_overrides(model_cfg: dict[str, Any], overrides: Iterable[str]) -> TitanConfig:
    """A model config (today's keys) with `model.key=value` overrides applied (e.g. model.kernels=torch,
    model.memory.select_dedup=0.97); a key the model or its memory kind does not have is an error naming it."""
    dotlist = [o[len("model."):] for o in overrides if o.startswith("model.")]
    try:
        base = OmegaConf.create(model_cfg)
        OmegaConf.set_struct(base, True)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        err = config_error(exc)
        raise ConfigError(f"model.{err.key}", str(err).split(": ", 2)[-1]) from None
    return TitanConfig.from_dict(OmegaConf.to_container(merged))


def load_model(path: str | Path, overrides: Iterable[str] = (), device: str | torch.device = "cpu",
               ckpt: Optional[dict[str, Any]] = None) -> TitanModel:
    """Build the model a checkpoint was trained with (plus `model.*` overrides) and load its weights."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    cfg = apply_model_overrides(stored_model_config(ckpt, path), overrides)
    with torch.device("meta"):
        model = TitanModel(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if is_legacy(checkpoint_config(ckpt)["model"]):
        state = migrate_state_dict(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({detail})") from None
    return model.eval()
