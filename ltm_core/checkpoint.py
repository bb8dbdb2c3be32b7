"""Loading checkpoints for inference and evaluation, with one-line errors.

A checkpoint is Lightning's `.ckpt` (written by `ltm train`): the resolved run config is kept under
`hyper_parameters["config"]`, the weights under `state_dict` with the prefix `model.`; or a safetensors folder
(written by `ltm export` and `ltm quantize`, see `ltm_core.export.safetensors`) read into the same dict, plus
`quantization` for a quantized one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ltm_core.config import DataConfig, TitanConfig
from ltm_core.configuration import config_error
from ltm_core.errors import CheckpointError, ConfigError, LtmError
from ltm_core.migration import complete_stored_config, is_legacy, migrate_model_config, migrate_state_dict
from ltm_core.model import TitanModel


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    from ltm_core.export.safetensors import is_folder_checkpoint, read_folder

    if is_folder_checkpoint(path):
        return read_folder(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint error: {path} is a folder: give the .ckpt file (e.g. "
                              f"{path / 'checkpoints' / 'last.ckpt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint error: {path} does not exist")
    try:  # weights_only: tensors and plain containers only; a pickled object that would run code is refused unrun
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle means the file is not a usable checkpoint
        code = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
        if code:
            raise CheckpointError(f"checkpoint error: {path} holds a pickled object that would run code "
                                  f"({code.group(1)}); refused without running it") from None
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise CheckpointError(f"checkpoint error: {path} is not a readable checkpoint ({reason})") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if (not isinstance(hparams, dict) or not isinstance(ckpt.get("state_dict"), dict)
            or not isinstance(hparams.get("config"), dict)):
        raise CheckpointError(f"checkpoint error: {path} is not an ltm checkpoint (no state_dict/config)")
    _check_stored_config(hparams["config"], path)
    return ckpt


def _check_stored_config(config: dict[str, Any], path: Path) -> None:
    """The run config a checkpoint carries: its model and data sections must be valid (one line naming the key
    otherwise): TitanConfig checks its own values, OmegaConf the data section's types."""
    for section in ("model", "data"):
        if not isinstance(config.get(section), dict):
            raise CheckpointError(f"checkpoint error: {path} has no {section} config")
    try:
        model = migrate_model_config(dict(config["model"]))  # a checkpoint of ltm < 0.2: today's keys
    except ConfigError:
        model = None  # a retired memory: stored_model_config says so when the model is built
    try:
        if model is not None:
            TitanConfig.from_dict(model)
        OmegaConf.structured(DataConfig(**config["data"]))
    except LtmError as exc:
        raise CheckpointError(f"checkpoint error: {path} carries an invalid config ({exc})") from None
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        key = getattr(exc, "full_key", None)
        detail = _first_sentence(str(exc))
        where = f"data.{key}: " if key else "data: "
        raise CheckpointError(f"checkpoint error: {path} carries an invalid config ({where}{detail})") from None


def check_tensors(state: dict[str, Any], reference: dict[str, torch.Tensor], path: Path, what: str = "weights") -> None:
    """`state` holds exactly `reference`'s names with the same shapes and a floating dtype where the reference is
    floating (load_state_dict would otherwise cast integers into weights silently). One CheckpointError line."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        name, problem = (missing[0], "is missing") if missing else (extra[0], "is not in the model")
        raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({what}: {name} {problem})")
    for name, ref in reference.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"checkpoint error: {path}: {name} is not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({name} has shape "
                                  f"{list(t.shape)}, the model {list(ref.shape)})")
        if ref.is_floating_point() != t.is_floating_point() or t.is_complex():
            raise CheckpointError(f"checkpoint error: {path}: {name} has dtype {t.dtype}, the model {ref.dtype}")


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of an error message, cut at a word boundary (with "...") when longer than `limit`."""
    line = text.strip().split("\n")[0] if text.strip() else ""
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + "..."


def checkpoint_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ckpt["hyper_parameters"]["config"]


def current_run_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The run config with the model config in today's keys: what an export or a quantized folder records."""
    return {**checkpoint_config(ckpt), "model": stored_model_config(ckpt, path)}


def stored_model_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The model config a checkpoint was trained with, in today's keys (a checkpoint of ltm < 0.2 is migrated;
    one that used a retired memory is refused in one line; options added since it was written take the value it
    was trained with, `complete_stored_config`)."""
    try:
        return complete_stored_config(migrate_model_config(dict(checkpoint_config(ckpt)["model"])))
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
    except yaml.YAMLError as exc:  # a value YAML cannot read (control characters)
        key = next((f"model.{o.split('=', 1)[0]}" for o in dotlist if not _yaml_readable(o.split("=", 1)[-1])),
                   "model")
        raise ConfigError(key, f"is not a readable value ({' '.join(str(exc).split())[:120]})") from None
    return TitanConfig.from_dict(OmegaConf.to_container(merged))


def _yaml_readable(value: str) -> bool:
    try:
        yaml.safe_load(value)
        return True
    except yaml.YAMLError:
        return False


def load_model(path: str | Path, overrides: Iterable[str] = (), device: str | torch.device = "cpu",
               ckpt: Optional[dict[str, Any]] = None) -> TitanModel:
    """Build the model a checkpoint was trained with (plus `model.*` overrides) and load its weights; a quantized
    checkpoint's layers are rebuilt quantized (`ltm_core.quantize`)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    cfg = apply_model_overrides(stored_model_config(ckpt, path), overrides)
    with torch.device("meta"):
        model = TitanModel(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if is_legacy(checkpoint_config(ckpt)["model"]):
        state = migrate_state_dict(state)
    if cfg.tie_word_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # safetensors folders store a tied weight once
    quantized: list[str] = []
    if ckpt.get("quantization"):
        from ltm_core.quantize import load_quantized_layers

        quantized = list(ckpt["quantization"]["layers"])
        state = load_quantized_layers(model, ckpt["quantization"], state, device)
    else:  # names, shapes and dtypes, in one line (a quantized model's layers were checked as they were rebuilt)
        check_tensors(state, model.state_dict(), Path(path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({detail})") from None
    missing = [k for k in result.missing_keys if not any(k.startswith(f"{q}.") for q in quantized)]
    if missing or result.unexpected_keys:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(result.unexpected_keys[:3])}"
        raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({detail})")
    return model.eval()
