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


def check_output_folder(out: Path, overwrite: bool, checkpoint: str | Path | None = None) -> Path:
    """An output folder that may be written: new, or an existing folder with `overwrite`. With `checkpoint` (the
    input: a .ckpt or a checkpoint folder), also one that neither is that input nor holds it, in any folder below:
    replacing it would delete the input (symbolic links resolved)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file: give a folder")
    if checkpoint is not None and out.exists():
        held = input_inside(out, Path(checkpoint))
        if held is not None:
            what = "is" if held else "holds"
            raise ConfigError("--out", f"{out} {what} the input checkpoint {checkpoint}; replacing it would delete "
                                       "the input: choose another folder")
    if out.exists() and not overwrite:
        raise ConfigError("--out", f"{out} already exists; pass --overwrite to replace it")
    return out


def input_inside(folder: Path, checkpoint: Path) -> bool | None:
    """Whether the existing `folder` is the input `checkpoint` (True) or one of the folders above it (False); None
    when neither. Compared as files (os.path.samefile), so that a symbolic link to the folder or in the input's
    path, a `..`, or a second name of the same folder, counts: the input's real path and, when the input is itself
    a link, the link's own place."""
    if not os.path.lexists(checkpoint):
        return None  # nothing to lose: reading the input reports it missing
    places = [Path(os.path.realpath(checkpoint))]
    if checkpoint.is_symlink():  # replacing a folder that holds the link deletes the link
        places.append(Path(os.path.realpath(checkpoint.parent)) / checkpoint.name)
    for place in places:
        for i, above in enumerate([place, *place.parents]):
            try:
                if os.path.samefile(above, folder):
                    return i == 0
            except OSError:
                continue
    return None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, Linux 4.7+); else
    set and restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_plainly_made(folder: Path) -> None:
    """Give `folder` and everything in it the permissions a plain mkdir / open gives under the process's umask:
    tempfile.mkdtemp makes the staging folder 0700, and some writers (safetensors' save_file) write 0600 files. A
    file keeps its executable bits' presence. Best effort: a file system without permissions keeps its own."""
    mask = current_umask()

    def plain(path: str, directory: bool) -> None:
        try:
            mode = os.lstat(path).st_mode
            wanted = (0o777 if directory or mode & 0o111 else 0o666) & ~mask | mode & 0o7000  # setgid etc. kept
            if mode & 0o7777 != wanted:
                os.chmod(path, wanted)
        except OSError:
            pass

    for root, _, files in os.walk(folder):
        plain(root, True)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                plain(os.path.join(root, name), False)


@contextmanager
def output_folder(out: Path, overwrite: bool = False, checkpoint: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; when the block succeeds it becomes `out` (replacing the old one
    with `overwrite`), with the permissions of a folder and files made plainly under the umask. On any failure the
    staging folder, and any parent folder made for it, is removed: an output is either complete or absent.
    `checkpoint`: the input, which `out` must neither be nor hold (check_output_folder)."""
    out = check_output_folder(Path(out), overwrite, checkpoint)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--out", f"cannot create the folder {out.parent} ({exc.strerror or exc})") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        as_plainly_made(staging)
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
    out = check_output_folder(Path(out), overwrite, checkpoint)
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
