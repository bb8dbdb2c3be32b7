"""Loading checkpoints for inference and evaluation, with one-line errors.

A checkpoint is Lightning's `.ckpt` (written by `ltm train`): the resolved run config is kept under
`hyper_parameters["config"]`, the weights under `state_dict` with the prefix `model.`; or a safetensors folder
(written by `ltm export` and `ltm quantize`, see `ltm_core.export.safetensors`) read into the same dict, plus
`quantization` for a quantized one.
"""

from __future__ import annotations

import codecs
import re
import warnings
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


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path` (a .ckpt or a safetensors folder) as a dict, or one CheckpointError line. `mmap`: a
    .ckpt's tensors are mapped from the file, not read, so that a reader needing only the config reads only that,
    and the ranks of a parallel run reading the same file share one copy in the page cache (torch's legacy,
    non-zip format is read whole). Only for a reader that drops the dict before the file can be replaced."""
    path = Path(path)
    from ltm_core.export.safetensors import is_folder_checkpoint, read_folder

    if is_folder_checkpoint(path):
        return read_folder(path)
    if path.is_dir():
        raise CheckpointError(folder_problem(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint error: {path} does not exist")
    try:  # weights_only: tensors and plain containers only; a pickled object that would run code is refused unrun
        with warnings.catch_warnings():  # torch's notes on a file it then fails to read (e.g. a pickle's protocol)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and (_head(path) or b"").startswith(ZIP_MAGIC))
    except Exception as exc:  # any failure to unpickle means the file is not a usable checkpoint
        code = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
        if code:
            raise CheckpointError(f"checkpoint error: {path} holds a pickled object that would run code "
                                  f"({code.group(1)}); refused without running it") from None
        raise CheckpointError(_part_of_export(path) or _unreadable(path, exc)) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if (not isinstance(hparams, dict) or not isinstance(ckpt.get("state_dict"), dict)
            or not isinstance(hparams.get("config"), dict)):  # (torch.load also reads a bare safetensors file)
        raise CheckpointError(_part_of_export(path) or (
            f"checkpoint error: {path} is a safetensors file without the config.json that `ltm export` writes "
            "beside it: give a folder written by `ltm export` / `ltm quantize`" if _is_safetensors(_head(path))
            else f"checkpoint error: {path} is not an ltm checkpoint (no state_dict/config)"))
    _check_stored_config(hparams["config"], path)
    return ckpt


ONNX_MANIFEST = "onnx.json"  # what `ltm export --format onnx` writes beside its graphs (ltm_core.export.onnx)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive holding ARCHIVE/data.pkl and the tensors' data
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch's older format: a pickled magic number first


def _onnx_export(what: str) -> str:
    """The line for an ONNX export given where a checkpoint is expected: what it is and how it runs instead."""
    return (f"checkpoint error: {what} an ONNX export (`ltm export --format onnx`), not a checkpoint: run it with "
            "onnxruntime through ltm_core.export.onnx.OnnxModel (its README.md shows how), or give the .ckpt or "
            "safetensors folder it was exported from")


def _is_onnx_export(folder: Path) -> bool:
    return (folder / ONNX_MANIFEST).is_file() or any(folder.glob("*.onnx"))


def _newest_ckpt(folder: Path) -> Optional[Path]:
    """folder/last.ckpt, else the most recently written .ckpt in folder; None without any."""
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def folder_problem(path: Path) -> str:
    """The line for a folder that is not a checkpoint folder: an ONNX export; a folder of .ckpt files (the run's
    checkpoints/: its last.ckpt, else its newest, named); a run folder (RUN/checkpoints/... named only where it
    exists); a sweep folder of runs; safetensors weights without their config.json; else a folder without any."""
    if _is_onnx_export(path):
        return _onnx_export(f"{path} is")
    held = _newest_ckpt(path)
    if held is not None:
        return f"checkpoint error: {path} is a folder: give the .ckpt file (e.g. {held})"
    run_ckpt = _newest_ckpt(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if run_ckpt is not None:
        return f"checkpoint error: {path} is a run folder: give its .ckpt file (e.g. {run_ckpt})"
    runs = sorted(path.glob("*/checkpoints/last.ckpt"), key=lambda p: (len(p.parts[-3]), p.parts[-3]))
    if runs:
        return (f"checkpoint error: {path} holds {len(runs)} run{'s' if len(runs) > 1 else ''}: give one's .ckpt "
                f"file (e.g. {runs[0]})")
    from ltm_core.export.safetensors import CONFIG, INDEX, WEIGHTS

    if (path / WEIGHTS).is_file() or (path / INDEX).is_file():
        return (f"checkpoint error: {path} holds safetensors weights but no {CONFIG}: not a complete folder written "
                "by `ltm export` / `ltm quantize`")
    where = " (its checkpoints/ folder is empty)" if (path / "checkpoints").is_dir() else ""
    return (f"checkpoint error: {path} is a folder: give the .ckpt file written by `ltm train` "
            f"(RUN/checkpoints/last.ckpt) or a folder written by `ltm export` / `ltm quantize`; this one holds no "
            f"checkpoint{where}")


def _part_of_export(path: Path) -> Optional[str]:
    """The line for a file of an export folder given in place of the folder: a file of an ONNX export (how it runs
    instead), or of a safetensors / hf checkpoint folder (give the folder); None otherwise."""
    from ltm_core.export.safetensors import is_folder_checkpoint

    folder = path.parent
    if path.suffix == ".onnx" or path.suffix != ".ckpt" and (folder / ONNX_MANIFEST).is_file():  # (a .ckpt: its own)
        return _onnx_export(f"{path} is a file of {folder},")
    if is_folder_checkpoint(folder):
        return f"checkpoint error: {path} is a file of the checkpoint folder {folder}: give the folder (-c {folder})"
    return None


def _head(path: Path) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError:
        return None


def _is_safetensors(head: Optional[bytes]) -> bool:
    """A safetensors file's start: the JSON header's length (8 bytes, little-endian), then "{"."""
    return bool(head) and len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2 ** 28


def _unreadable(path: Path, exc: Exception) -> str:
    """The line for a file torch.load could not read, in words a user understands: an empty file, a damaged or
    truncated torch file (torch's own detail kept), or a file of another kind (what it looks like)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:  # e.g. permission denied
        return f"checkpoint error: {path} cannot be read ({err.strerror or err})"
    return f"checkpoint error: {path} is not a readable checkpoint ({_unreadable_reason(path, head, exc)})"


def _unreadable_reason(path: Path, head: bytes, exc: Exception) -> str:
    if not head:
        return "the file is empty"
    if head.startswith(ZIP_MAGIC):  # torch's format, or another zip archive
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = None  # the zip directory itself is unreadable: truncated or damaged
        if names is not None and not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a zip archive, not a torch checkpoint file: it holds no data.pkl"
        if names is None and isinstance(exc, OSError):  # (torch's reader then fails on a seek: "Invalid argument")
            return "damaged or truncated torch file: its zip archive's central directory is missing"
        return f"damaged or truncated torch file: {_torch_detail(exc)}"
    if head.startswith(LEGACY_MAGIC):
        return f"damaged or truncated torch file: {_torch_detail(exc)}"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's protocol mark, without torch's magic number
        return "a pickle, not a torch checkpoint file"
    try:  # (not final: a character cut at the 64th byte still reads as text)
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "not a torch checkpoint file: it holds text"
    return "not a torch checkpoint file"


def _torch_detail(exc: Exception) -> str:
    """torch.load's reason without its internals: the weights-only unpickler's own error line, the zip reader's
    message without its source location; "the file ends early" for an end of file."""
    if isinstance(exc, EOFError):
        return "the file ends early"
    text = str(exc)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler:
        text = unpickler.group(1)
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text.strip())
    text = re.sub(r"^PytorchStreamReader ", "", text)
    return _first_sentence(text) or type(exc).__name__


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
                              f"{err.detail}") from None


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
        raise ConfigError(f"model.{err.key}", err.detail) from None
    except yaml.YAMLError as exc:  # a value YAML cannot read (control characters)
        key = next((f"model.{o.split('=', 1)[0]}" for o in dotlist if not _yaml_readable(o.split("=", 1)[-1])),
                   "model")
        raise ConfigError(key, f"is not a readable value ({' '.join(str(exc).split())[:120]})") from None
    return TitanConfig.from_dict(OmegaConf.to_container(merged))


def _weight_shapes(cfg: TitanConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in TitanModel(cfg).state_dict().items()}


def check_same_weights(model_cfg: dict[str, Any], overrides: Iterable[str]) -> None:
    """ConfigError naming the first `model.*` override that changes the weights the stored model has (names or
    shapes: e.g. model.use_memory=false, model.hidden_size=64), instead of blaming the checkpoint for not fitting."""
    overrides = [o for o in overrides if o.startswith("model.")]
    if not overrides:
        return
    stored = _weight_shapes(TitanConfig.from_dict(model_cfg))
    for override in overrides:
        changed = _weight_shapes(apply_model_overrides(model_cfg, [override]))
        if changed != stored:
            gone = sorted(stored.keys() - changed.keys()) or sorted(changed.keys() - stored.keys()) or \
                sorted(k for k in stored if stored[k] != changed[k])
            raise ConfigError(override.split("=", 1)[0], f"={override.split('=', 1)[1]} changes the model's weights "
                              f"({gone[0]}), so the checkpoint's cannot load into it; give only overrides that keep "
                              "them (e.g. model.kernels, model.memory.select_dedup)")


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
    stored = stored_model_config(ckpt, path)
    cfg = apply_model_overrides(stored, overrides)
    check_same_weights(stored, overrides)
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
