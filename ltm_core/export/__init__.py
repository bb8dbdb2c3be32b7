"""`ltm export`: a checkpoint as a safetensors folder, a Hugging Face folder or ONNX graphs (one module per format),
each written into a staging folder that replaces the output only once complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ltm_core.errors import ConfigError, LtmError


def check_output_folder(out: Path, overwrite: bool) -> Path:
    """An output folder that may be written: new, or an existing folder with `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file: give a folder")
    if out.exists() and not overwrite:
        raise ConfigError("--out", f"{out} already exists; pass --overwrite to replace it")
    return out


@contextmanager
def output_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; when the block succeeds it becomes `out` (replacing the old one
    with `overwrite`). On any failure the staging folder, and any parent folder made for it, is removed: an output
    is either complete or absent."""
    out = check_output_folder(Path(out), overwrite)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--out", f"cannot create the folder {out.parent} ({exc.strerror or exc})") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


FORMATS = ("safetensors", "hf", "onnx")


def require(extra: str, *modules: str) -> None:
    """One line naming the extra to install when a module it brings is missing (checked before importing it)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LtmError(f"{extra} needs {', '.join(missing)}: pip install 'ltm[{extra}]'")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, overwrite: bool = False,
                      max_shard_bytes: int | None = None) -> Path:
    """Export `checkpoint` (a .ckpt or a safetensors folder) as `fmt` into the folder `out`; returns `out`."""
    from ltm_core.checkpoint import read_checkpoint

    check_format(fmt)
    out = check_output_folder(Path(out), overwrite)
    ckpt = read_checkpoint(checkpoint)
    quantized = ckpt.get("quantization")
    if quantized and fmt != "safetensors":
        raise LtmError(f"export error: {checkpoint} is quantized ({quantized['method']}); the {fmt} format holds "
                       "unquantized weights: export the unquantized checkpoint (or use --format safetensors)")
    if fmt == "safetensors":
        from ltm_core.export.safetensors import export_safetensors

        return export_safetensors(checkpoint, ckpt, out, overwrite, max_shard_bytes)
    if fmt == "hf":
        require("hf", "transformers")
        from ltm_core.export.hf import export_hf

        return export_hf(checkpoint, ckpt, out, overwrite, max_shard_bytes)
    from ltm_core.export.onnx import export_onnx

    return export_onnx(checkpoint, ckpt, out, overwrite)
