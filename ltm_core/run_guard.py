"""Keeping a run's work safe whatever happens to its process (docs/reliability.md).

- `atomic_save`: a checkpoint file is either the old one or the whole new one (temporary file, fsync, rename), and a
  failed write (a full disk) leaves the old one and raises one line. `ltm_core.lit.AtomicCheckpointIO` is
  Lightning's checkpoint IO plugin doing so, and reading checkpoints back with `torch.load(weights_only=True)`.
- `RunLock`: one `ltm train` per output folder (a kernel lock on OUTPUT_DIR/.lock, released however the process dies).
- `Interrupts`: SIGINT / SIGTERM set a flag; the training loop saves a checkpoint after the current optimizer step and
  stops with one line naming the checkpoint and the command that continues the run (`resume_command`).
- `TrainingStream`: the random numbers the training steps draw (the select write's Gumbel noise) come from a stream of
  their own that checkpoints carry, so a resumed run draws exactly what an uninterrupted one would.
- `ltm_core.lit.GuardCallback`: the Lightning side of the last two, plus the wall-clock checkpoint interval.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ltm_core.errors import CheckpointError, ConfigError, LtmError


def launched_externally() -> bool:
    """True under torchrun / torch elastic / SLURM / mpirun, which start the processes themselves."""
    return any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0


# ------------------------------------------------------------------------------------------------ atomic files
SAVE_HOOK_ENV = "LTM_SAVE_HOOK_PAUSE"
RESUME_COMMAND_ENV = "LTM_RESUME_COMMAND"  # set by the local launcher for its workers


class SaveFailed(CheckpointError):
    """A checkpoint could not be written (no space, no permission); the previous checkpoint is intact."""


def save_hook(phase: str, path: Path) -> None:
    """Test hook: with LTM_SAVE_HOOK_PAUSE=SECONDS in the environment every save announces each of its phases on stderr
    (`ltm-save-hook PHASE PATH`) and pauses there, so that a test can kill the process inside a save. Off otherwise."""
    pause = os.environ.get(SAVE_HOOK_ENV)
    if pause:
        print(f"ltm-save-hook {phase} {path}", file=sys.stderr, flush=True)
        time.sleep(float(pause))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the folder's entry is data of its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failed(path: Path, exc: BaseException) -> SaveFailed:
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:160] or type(exc).__name__
    kept = f"the previous {path.name} is intact" if path.exists() else "no earlier checkpoint was there"
    return SaveFailed(f"checkpoint error: cannot write {path} ({reason}); {kept}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[io.BufferedWriter]:
    """Open a temporary file beside `path` for writing; on success fsync it and rename it over `path` (then fsync the
    folder), so `path` is always the old file or the whole new one. A failed write removes the temporary file and
    raises SaveFailed (one line); any other failure removes it and propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        save_hook("written", path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc)):
            raise _write_failed(path, exc) from None  # torch's zip writer reports a failed write as RuntimeError
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save(obj)` to `path` through `atomic_file`."""
    with atomic_file(path) as f:
        if os.environ.get(SAVE_HOOK_ENV):  # test hook: a kill at this pause leaves half a temporary file
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getbuffer()
            f.write(data[:len(data) // 2])
            f.flush()
            save_hook("partial", path)
            f.write(data[len(data) // 2:])
        else:
            torch.save(obj, f)


def writable_folder(folder: Path, key: str) -> None:
    """`folder` exists and can be written into, or can be made (checked by making it, then removing what was made:
    nothing is left before the work that fills it). One ConfigError line naming `key` otherwise."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(key, f"{folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(key, f"cannot write into {folder}")
        return
    made = [folder, *[p for p in folder.parents if not p.exists()]]  # deepest first
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create {folder} ({exc.strerror or exc})") from None
    for path in made:
        path.rmdir()


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of saves that a killed run left behind (the caller holds the folder's RunLock)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def drop_metrics_from(path: Path, step: int) -> None:
    """Remove the rows of metrics.csv whose `step` column (Lightning's logging step: one per micro-batch) is `step`
    or later: the work of a run killed after its last checkpoint, which the resumed run logs again."""
    import csv

    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [r for r in rows[1:] if not (len(r) > col and r[col].lstrip("-").isdigit() and int(r[col]) >= step)]
    if len(kept) < len(rows) - 1:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([rows[0], *kept])
        with atomic_file(path) as f:
            f.write(text.getvalue().encode())


def add_missing_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """Append `row` to metrics.csv unless a row of its step with a train/loss is there (a run killed after saving a
    step and before Lightning wrote that step's row)."""
    import csv

    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    if "step" not in header or any(r.get("step") == str(row["step"]) and r.get("train/loss") for r in rows):
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([*rows, {"epoch": 0, **row}])
    with atomic_file(path) as f:
        f.write(text.getvalue().encode())


# ------------------------------------------------------------------------------------------------------ lock
class RunInUse(LtmError):
    """Another live process trains into the output folder."""


class RunLock:
    """OUTPUT_DIR/.lock, holding the pid and host of the process that trains into the folder. The lock is the kernel's
    (flock), released when that process exits however it exits: a lock file left by a killed run is taken over, a
    live run's makes a second `ltm train` refuse (RunInUse, one line). POSIX; on network file systems flock holds
    only where the server supports it (NFSv4 does)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunInUse(f"output error: {self.folder} is in use by a running `ltm train` ({holder}); wait for "
                               "it to end, stop it, or choose another output_dir") from None
            try:  # the holder may have removed the file between our open and flock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------- randomness
def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """The global random states (torch CPU, the CUDA device's, numpy, Python), as `torch.load(weights_only=True)`
    reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": (int(has_gauss), float(gauss)), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    random.setstate(state["python"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_rng_state(state: Any, where: str) -> None:
    """A stored random state that `set_rng_state` can use, or one CheckpointError line."""
    ok = (isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor) and state["torch"].dtype == torch.uint8
          and isinstance(state.get("numpy"), torch.Tensor) and state["numpy"].shape == (624,)
          and isinstance(state.get("numpy_pos"), int) and isinstance(state.get("python"), tuple))
    if ok:
        try:
            saved = rng_state()
            set_rng_state(state)
            set_rng_state(saved)
            return
        except (TypeError, ValueError, RuntimeError):
            pass
    raise CheckpointError(f"checkpoint error: {where} holds a damaged random state")


class TrainingStream:
    """The random stream of the training steps, kept apart from other draws (a DataLoader draws a seed each time a
    validation starts) and saved in checkpoints: a resumed run continues it exactly. The first step starts from the
    global state as seeded; `active()` swaps the stream in around a step and the global state back after it."""

    def __init__(self) -> None:
        self.state: Optional[dict[str, Any]] = None  # None: not started (the first step takes the global state)

    @contextlib.contextmanager
    def active(self, device: Optional[torch.device] = None) -> Iterator[None]:
        outer = rng_state(device)
        if self.state is not None:
            set_rng_state(self.state, device)
        try:
            yield
        finally:
            self.state = rng_state(device)
            set_rng_state(outer, device)


# ------------------------------------------------------------------------------------------------ interrupts
class Interrupts:
    """SIGINT and SIGTERM record the signal instead of stopping the process wherever it is; the training loop asks
    `requested` after each optimizer step, saves there and stops. Further signals are ignored until then (SIGKILL
    still works: atomic saves keep the last checkpoint whole). Installs in the main thread only (Python's rule)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        """(Re)install the handlers; the first call remembers the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "Interrupts":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def interrupted_message(signum: int, step: int, checkpoint: Path, command: str) -> str:
    name = signal.Signals(signum).name
    return f"interrupted by {name}: saved step {step} to {checkpoint}; continue with: {command}"


# ------------------------------------------------------------------------------------------- resume command
_PLAIN = re.compile(r"^[A-Za-z0-9_./@:+-]+$")
_RUN_KEYS = ("output_dir", "resume", "overwrite")


def _override_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    literal = text.lower() in ("null", "true", "false", "nan", "inf", "-inf") or _is_number(text)
    if _PLAIN.match(text) and not literal:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def derived_overrides(cfg) -> list[str]:
    """Overrides that rebuild `cfg` from the default config: each leaf key whose value differs."""
    from ltm_core.configuration import compose, to_dict

    base, run = _leaves(to_dict(compose([]))), _leaves(to_dict(cfg))
    return [f"{k}={_override_value(v)}" for k, v in run.items()
            if k not in _RUN_KEYS and (k not in base or base[k] != v)]


def _cli_overrides(cfg) -> Optional[list[str]]:
    """The overrides `ltm train` was given for this run (a sweep job: its own values), when running inside the CLI."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if str(Path(hydra_cfg.runtime.output_dir).resolve()) != str(Path(cfg.output_dir).resolve()):
            return None  # left over from an earlier run in this process
        return list(hydra_cfg.overrides.task)
    except Exception:  # no Hydra run: rebuild the overrides from the config instead
        return None


def diverged_advice(cfg, last: Path, saved_step: Optional[int], resumed_from: Optional[str | Path]) -> str:
    """What follows a divergence's line: the checkpoint that holds the run's good work and the command that goes on
    from it, never with the learning rate that diverged: the command says `optim.lr=LOWER`, for the user to
    replace with a lower rate (left as it is, the config check names the key). `saved_step`: the step of this run's newest last.ckpt, None if it wrote none;
    `resumed_from`: the checkpoint the run started from, if any."""
    lower = ("optim.lr=LOWER",)
    if saved_step is not None:
        return (f"the last good checkpoint is {last} (step {saved_step}): lower optim.lr, then continue with: "
                f"{resume_command(cfg, lower)}")
    if resumed_from:  # it saved nothing new: the checkpoint it started from is still the one to continue from
        mine = Path(last).parent.resolve()
        source = Path(resumed_from).resolve()
        again = "auto" if mine in source.parents else str(resumed_from)  # (a dcp folder: checkpoints/dcp/...)
        return (f"the last good checkpoint is {resumed_from}, which this run resumed from: lower optim.lr, then "
                f"continue with: {resume_command(cfg, lower, again)}")
    return ("it saved no checkpoint to continue from: start again with a lower optim.lr: "
            f"{resume_command(cfg, lower, None)}")


def resume_command(cfg, changes: tuple[str, ...] = (), resume: Optional[str] = "auto") -> str:
    """The `ltm train` command that continues this run: its overrides (as given to the CLI, else rebuilt from the
    config), output_dir and resume=auto. `changes` replace the overrides of their keys (e.g. `optim.lr=LOWER`,
    which the user replaces with a value); `resume`: another checkpoint to continue from (with overwrite=true: the
    folder holds this run), or None: no checkpoint, start the run again (overwrite=true)."""
    from ltm_core.configuration import override_key

    if os.environ.get(RESUME_COMMAND_ENV):  # a worker of a launched run: the command the launcher worked out
        overrides = shlex.split(os.environ[RESUME_COMMAND_ENV])[2:]
    else:
        overrides = _cli_overrides(cfg)
        if overrides is None:
            overrides = derived_overrides(cfg)
    changed = {override_key(c) for c in changes}
    keep = [o for o in overrides if override_key(o) not in _RUN_KEYS and override_key(o) not in changed]
    run = ["resume=auto"] if resume == "auto" else ["overwrite=true"] if resume is None else [
        f"resume={resume}", "overwrite=true"]
    return " ".join(["ltm", "train", *map(shlex.quote, [*keep, *changes, f"output_dir={cfg.output_dir}", *run])])


