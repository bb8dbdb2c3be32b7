"""Distributed checkpoints (torch.distributed.checkpoint) and their consolidation into a single-device .ckpt.

Layout under OUTPUT_DIR/checkpoints/:
    dcp/step-00000100/     sharded model + optimizer state (every rank writes its shards), train_state.json,
                           random-rank00000.pt ... (each rank's random state: exact resume with select noise)
    dcp/latest             the name of the newest complete step folder (replaced atomically once every file of the
                           step is written: a kill at any moment leaves it naming a whole checkpoint)
    last.ckpt              the consolidated single-device checkpoint (Lightning format: `state_dict` with the
                           prefix `model.`, `hyper_parameters["config"]`), loadable by `ltm generate` / `ltm eval`
    best.ckpt              a copy of last.ckpt at the lowest validation loss

Keys are the single-device parameter names (stages keep the original block indices), so a checkpoint resumes on
another dp or pp layout; resharding the tensor-parallel dimension works between tp > 1 layouts (fused
projections are stored [chunks, out / chunks, in] there) and consolidation always writes the canonical shapes.
A tied LM head is stored once (as `embed_tokens.weight`, with one optimizer state) by a layout without pipeline
stages; the last stage of a pipelined layout then takes its copy of the head, and its optimizer state, from there
(`_tied_aliases`).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ltm_core import run_guard
from ltm_core.config import TitanConfig
from ltm_core.errors import CheckpointError
from ltm_core.model import TitanModel

OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def dcp_root(out: Path) -> Path:
    return Path(out) / "checkpoints" / "dcp"


def latest_dcp(out: Path) -> Optional[Path]:
    root = dcp_root(out)
    marker = root / "latest"
    if marker.is_file():
        name = marker.read_text(errors="replace").strip()
        path = root / name
        if not re.fullmatch(r"step-\d{8}", name):
            return None
        if (path / ".metadata").is_file() and (path / "train_state.json").is_file():
            return path
    return None


def _state(parts, optimizers) -> tuple[dict[str, Any], list[dict], list[dict]]:
    models = [get_model_state_dict(p) for p in parts]
    optims = [get_optimizer_state_dict(p, o, options=OPTIM_OPTIONS) for p, o in zip(parts, optimizers)]
    merged_model = {k: v for m in models for k, v in m.items()}
    merged_optim = {k: v for o in optims for k, v in o.items()}
    return {"model": merged_model, "optim": merged_optim}, models, optims


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer with the save test hook (`run_guard.save_hook`) between the shards and the metadata."""

    def finish(self, metadata, results) -> None:
        run_guard.save_hook("shards", self.path)
        super().finish(metadata, results)


class _SafeUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: read it admitting only the classes DCP's metadata is made of (the dataclasses
    of torch.distributed.checkpoint.metadata, torch.Size, dtypes, ...), so that a tampered file cannot run code
    (torch's own reader would unpickle anything)."""

    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as dcp_metadata

        allowed = ((module, name) in self.NAMES
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
                   or (module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type)))
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            metadata = _SafeUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint error: {path} is not a usable checkpoint index ({exc}); refused") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _random_file(path: Path, rank: int) -> Path:
    return path / f"random-rank{rank:05d}.pt"


def save(out: Path, step: int, parts, optimizers, train_state: dict[str, Any], device: torch.device) -> Path:
    """Collective: every rank writes its shards and its random state; rank 0 then writes train_state.json and, last,
    the `latest` marker (atomically), and removes older steps."""
    path = dcp_root(out) / f"step-{step:08d}"
    if dist.get_rank() == 0 and path.exists():  # left half-written by a killed save of this step
        shutil.rmtree(path)
    dist.barrier()
    state, _, _ = _state(parts, optimizers)
    try:
        dcp.save(state, storage_writer=_Writer(str(path)))
        run_guard.atomic_save(run_guard.rng_state(device), _random_file(path, dist.get_rank()))
    except Exception as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise run_guard.SaveFailed(f"checkpoint error: cannot write {path} ({' '.join(str(exc).split())[:160]}); "
                                   "the previous checkpoint is intact") from None
    dist.barrier()
    if dist.get_rank() == 0:
        with run_guard.atomic_file(path / "train_state.json") as f:
            f.write(json.dumps(train_state, indent=1).encode())
        run_guard.save_hook("marker", dcp_root(out) / "latest")
        with run_guard.atomic_file(dcp_root(out) / "latest") as f:
            f.write(path.name.encode())
        for old in dcp_root(out).glob("step-*"):  # keep the newest only
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _saved_tp(path: Path) -> Optional[int]:
    """The tensor-parallel degree a distributed checkpoint was saved with (its train_state.json), if it says."""
    try:
        return int(json.loads((path / "train_state.json").read_text())["layout"]["tp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_TIED = {"lm_head.weight": "embed_tokens.weight", "embed_tokens.weight": "lm_head.weight"}


def _tied_aliases(state: dict[str, dict[str, Any]], saved: set[str]) -> tuple[dict[str, dict[str, Any]], dict]:
    """The state to ask DCP for, and {(top, key): key read instead} for the keys read under another name.

    A key this layout holds but the checkpoint lacks, that names a tied embedding / LM head weight or its optimizer
    state (`model.lm_head.weight`, `optim.state.lm_head.weight.exp_avg`, `optim.param_groups.lm_head.weight.lr`, ...),
    is read from its twin (`embed_tokens.weight` ...) when the checkpoint has that: a layout without pipeline stages
    stores the tied weight once, and both copies of a pipelined layout step identically (`sync_tied_embeddings`).
    Any other key is asked for under its own name (a missing one stays DCP's error)."""
    request: dict[str, dict[str, Any]] = {}
    aliases: dict[tuple[str, str], str] = {}
    for top, entries in state.items():
        request[top] = dict(entries)
        for key in entries:
            if f"{top}.{key}" in saved:
                continue
            for name, twin in _TIED.items():
                source = re.sub(rf"(^|\.){re.escape(name)}(\.|$)", rf"\g<1>{twin}\g<2>", key, count=1)
                if source != key and f"{top}.{source}" in saved:
                    del request[top][key]
                    # read into our own copy, unless this rank holds the twin too (then copied from it after)
                    request[top].setdefault(source, entries[key])
                    aliases[(top, key)] = source
                    break
    return request, aliases


def _one_line(exc: BaseException) -> str:
    """One readable line for an exception: for DCP's CheckpointException (every failed rank's traceback), the
    first failed rank's error (`Missing key in checkpoint state_dict: ...`); else the last line of its text."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = sorted(exc.failures.items())[0]
        return f"rank {rank}: {_one_line(inner)}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def load(path: Path, parts, optimizers, device: torch.device, tp: int) -> dict[str, Any]:
    """Collective: load the shards of `path` into the parts and optimizers (of a layout with `tp` tensor-parallel
    ranks) and this rank's random state (when the checkpoint has one for this rank: a resume on more ranks starts
    theirs from the seeded state); returns the train state."""
    saved = _saved_tp(path)
    if saved is not None and (saved > 1) != (tp > 1):  # fused projections are stored in another shape there
        raise CheckpointError(f"checkpoint error: {path} was saved with tp={saved} and resumes on layouts with tp "
                              f"{'> 1' if saved > 1 else '= 1'} only, not tp={tp}: continue it with such a preset, or "
                              f"train from its weights in a new folder (output_dir=NEW "
                              f"resume={path.parent.parent / 'last.ckpt'})")
    state, models, optims = _state(parts, optimizers)
    try:
        saved_keys = set(_Reader(str(path)).read_metadata().state_dict_metadata)
        request, aliases = _tied_aliases(state, saved_keys)
        dcp.load(request, storage_reader=_Reader(str(path)))
        for top, entries in state.items():  # back under this layout's names (DCP loads a tensor in place and
            for key, target in entries.items():  # replaces any other value)
                loaded = request[top][aliases.get((top, key), key)]
                if loaded is target:
                    continue
                if isinstance(target, torch.Tensor) and type(target) is type(loaded):
                    target.copy_(loaded)
                else:
                    entries[key] = loaded
        train_state = json.loads((path / "train_state.json").read_text())
        if not isinstance(train_state, dict):
            raise ValueError("train_state.json is not an object")
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # a layout the checkpoint cannot be resharded to, or a damaged
        # checkpoint (torch's CheckpointException, which gathers every rank's error, is not an Exception)
        raise CheckpointError(f"checkpoint error: cannot resume from {path} ({_one_line(exc)})") from None
    for part, opt, m, o in zip(parts, optimizers, models, optims):
        set_model_state_dict(part, {k: state["model"][k] for k in m})
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in o}, options=OPTIM_OPTIONS)
    random_file = _random_file(path, dist.get_rank())
    if random_file.is_file():
        try:
            random_state = torch.load(random_file, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"checkpoint error: {random_file} is not a readable random state") from None
        run_guard.check_rng_state(random_state, str(random_file))
        run_guard.set_rng_state(random_state, device)
    return train_state


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP checkpoint, read in this process alone."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=_Reader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]


def consolidate(path: Path, target: Path, config: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the single-device checkpoint `target` from the DCP checkpoint `path` (no process group needed)."""
    from importlib.metadata import version

    tensors = read_model_state(path)
    with torch.device("meta"):
        reference = TitanModel(TitanConfig.from_dict(config["model"]))
    state = {}
    for name, ref in reference.state_dict().items():
        tied = {"lm_head.weight": "embed_tokens.weight", "embed_tokens.weight": "lm_head.weight"}.get(name)
        t = tensors.get(name, tensors.get(tied) if tied else None)
        if t is None:
            raise CheckpointError(f"checkpoint error: {path} has no tensor {name}")
        state[f"model.{name}"] = t.detach().reshape(ref.shape).cpu().contiguous()
    train_state = json.loads((path / "train_state.json").read_text()) if (path / "train_state.json").exists() else {}
    ckpt = {"epoch": 0, "global_step": int(train_state.get("step", 0)), "pytorch-lightning_version": version("lightning"),
            "state_dict": state, "hyper_parameters": {"config": config},
            "samples_seen": int(train_state.get("samples_seen", 0)), "dcp_checkpoint": str(path)}
    ckpt.update(extra or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    run_guard.atomic_save(ckpt, target)
    return target


def consolidate_run(output_dir: str | Path, target: Optional[str | Path] = None) -> Path:
    """Offline: write OUTPUT_DIR/checkpoints/last.ckpt (or `target`) from the run's newest DCP checkpoint and its
    config.yaml, in one process without a process group (e.g. after a crash between save and consolidation)."""
    from omegaconf import OmegaConf

    out = Path(output_dir)
    path = latest_dcp(out)
    if path is None:
        raise CheckpointError(f"checkpoint error: {out} holds no distributed checkpoint (checkpoints/dcp/latest)")
    config = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)
    return consolidate(path, Path(target) if target else out / "checkpoints" / "last.ckpt", config)
