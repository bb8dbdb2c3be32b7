"""The folders `ltm export` and `ltm quantize` write (ltm_core.export.output_folder): made as a plain mkdir / open
would make them under the umask, and never the input's folder: `--overwrite` there would delete the input."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from support import invoke, one_error_line
from ltm_core.errors import ConfigError
from ltm_core.export import check_output_folder, current_umask, export_checkpoint, output_folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _modes(folder: Path) -> dict[str, int]:
    """Each entry of `folder` (itself as ".") -> its permission bits."""
    return {".": _mode(folder), **{str(p.relative_to(folder)): _mode(p) for p in folder.rglob("*")}}


@pytest.fixture
def umask():
    """Set the umask for one test (returns a setter); the old one comes back after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _run(trained_tiny, root: Path) -> dict[str, bytes]:
    """A copy of the shared checkpoint as ROOT/run/checkpoints/{last,best}.ckpt (a test that deleted the input would
    delete a copy, not the session's checkpoint) -> each file's bytes, to compare afterwards."""
    checkpoints = root / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        shutil.copyfile(trained_tiny, checkpoints / name)
    return _contents(root / "run")


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_current_umask_reads_without_changing_it(umask):
    for mask in (0o022, 0o027, 0o002):
        umask(mask)
        assert current_umask() == mask and current_umask() == mask


def test_output_folder_gets_the_umasks_permissions(tmp_path, umask):
    """Whatever the writers made private (mkdtemp's 0700, mkstemp's 0600: safetensors writes its files so) ends as
    a plain mkdir / open would make it; an executable file stays executable, a symbolic link is left alone."""
    for mask, folder, file, program in ((0o022, 0o755, 0o644, 0o755), (0o027, 0o750, 0o640, 0o750),
                                        (0o077, 0o700, 0o600, 0o700)):
        umask(mask)
        out = tmp_path / f"out-{mask:o}"
        with output_folder(out) as staging:
            fd, private = tempfile.mkstemp(dir=staging)
            os.close(fd)
            os.rename(private, staging / "weights.bin")
            sub = Path(tempfile.mkdtemp(dir=staging))
            (sub / "inner.json").write_text("{}")
            os.chmod(sub / "inner.json", 0o600)
            (staging / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(staging / "run.sh", 0o700)
            (staging / "link").symlink_to("weights.bin")
        modes = _modes(out)
        assert modes.pop(".") == folder and modes.pop(sub.name) == folder
        assert modes.pop("link") == _mode(out / "link")  # a link's own bits: untouched
        assert modes.pop("run.sh") == program
        assert modes == {"weights.bin": file, f"{sub.name}/inner.json": file}


def test_export_and_quantize_folders_follow_the_umask(trained_tiny, tmp_path, umask):
    umask(0o022)
    st = tmp_path / "st"
    assert invoke("export", "-c", str(trained_tiny), "--format", "safetensors", "--out", str(st)).returncode == 0
    assert _modes(st) == {".": 0o755, "model.safetensors": 0o644, "config.json": 0o644}
    umask(0o027)
    again = invoke("export", "-c", str(trained_tiny), "--format", "safetensors", "--out", str(st), "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _modes(st) == {".": 0o750, "model.safetensors": 0o640, "config.json": 0o640}
    umask(0o022)
    q = tmp_path / "q"
    result = invoke("quantize", "-c", str(trained_tiny), "--method", "bnb.int8", "--out", str(q), "--gen-tokens", "2",
                    "data.val_samples=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _modes(q) == {".": 0o755, "model.safetensors": 0o644, "config.json": 0o644}


def test_overwrite_never_deletes_the_input_checkpoint(trained_tiny, tmp_path):
    """--out the checkpoint's folder, the run, any folder above, or one of these through a symbolic link (the
    --out's or the input's): refused in one line before any work, for every format and for quantize, and the run
    keeps every byte."""
    before = _run(trained_tiny, tmp_path)
    run = tmp_path / "run"
    (tmp_path / "alias").symlink_to(run / "checkpoints")
    (tmp_path / "run-link").symlink_to(run)
    last = str(run / "checkpoints" / "last.ckpt")
    cases = [(last, run / "checkpoints"), (last, run), (last, tmp_path), (last, run / "checkpoints" / ".."),
             (last, tmp_path / "run-link"), (str(tmp_path / "alias" / "last.ckpt"), run / "checkpoints")]
    for checkpoint, out in cases:
        for fmt in ("safetensors", "hf", "onnx"):
            one_error_line(invoke("export", "-c", checkpoint, "--format", fmt, "--out", str(out), "--overwrite"),
                           "--out", f"{out} holds the input checkpoint {checkpoint}", "choose another folder")
            assert _contents(run) == before, (checkpoint, out, fmt)
        one_error_line(invoke("quantize", "-c", checkpoint, "--method", "bnb.int8", "--out", str(out), "--overwrite",
                              "--gen-tokens", "2", "data.val_samples=1"),
                       "--out", f"{out} holds the input checkpoint {checkpoint}")
        assert _contents(run) == before, (checkpoint, out, "quantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "run", "run-link"]  # no staging folder left


def test_a_checkpoint_link_in_out_is_refused(trained_tiny, tmp_path):
    """A link to a checkpoint kept elsewhere: replacing its folder would delete the link."""
    _run(trained_tiny, tmp_path)
    links = tmp_path / "links"
    links.mkdir()
    (links / "last.ckpt").symlink_to(tmp_path / "run" / "checkpoints" / "last.ckpt")
    one_error_line(invoke("export", "-c", str(links / "last.ckpt"), "--format", "safetensors", "--out", str(links),
                          "--overwrite"), "holds the input checkpoint")
    assert (links / "last.ckpt").is_symlink()


def test_overwrite_never_deletes_an_input_folder(trained_tiny, tmp_path):
    """A safetensors folder given as the input: --out that folder, or one above it, is refused likewise."""
    st = tmp_path / "models" / "st"
    assert invoke("export", "-c", str(trained_tiny), "--format", "safetensors", "--out", str(st)).returncode == 0
    before = _contents(tmp_path / "models")
    for fmt in ("safetensors", "hf", "onnx"):
        one_error_line(invoke("export", "-c", str(st), "--format", fmt, "--out", str(st), "--overwrite"),
                       f"{st} is the input checkpoint {st}", "choose another folder")
        one_error_line(invoke("export", "-c", str(st), "--format", fmt, "--out", str(st.parent), "--overwrite"),
                       f"{st.parent} holds the input checkpoint {st}")
        assert _contents(tmp_path / "models") == before
    one_error_line(invoke("quantize", "-c", str(st), "--method", "bnb.int8", "--out", str(st), "--overwrite",
                          "--gen-tokens", "2", "data.val_samples=1"), f"{st} is the input checkpoint")
    assert _contents(tmp_path / "models") == before
    # beside the input, and in a new folder inside it, stays allowed
    assert invoke("export", "-c", str(st), "--format", "safetensors", "--out", str(tmp_path / "models" / "again"),
                  "--overwrite").returncode == 0


def test_library_callers_are_told_the_same_without_overwrite(trained_tiny, tmp_path):
    """export_checkpoint / check_output_folder name the input before 'already exists' (which --overwrite would
    not fix), and leave other folders alone."""
    _run(trained_tiny, tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds the input checkpoint"):
            export_checkpoint(last, "safetensors", tmp_path / "run", overwrite=overwrite)
        with pytest.raises(ConfigError, match="holds the input checkpoint"):
            check_output_folder(tmp_path, overwrite, last)
    (tmp_path / "elsewhere").mkdir()
    assert check_output_folder(tmp_path / "elsewhere", True, last) == tmp_path / "elsewhere"
    assert check_output_folder(tmp_path / "new", False, last) == tmp_path / "new"
    # a missing input: nothing to protect; reading it reports it
    assert check_output_folder(tmp_path / "run", True, tmp_path / "run" / "missing.ckpt") == tmp_path / "run"
    assert _contents(tmp_path / "run").keys() == {"checkpoints/last.ckpt", "checkpoints/best.ckpt"}
