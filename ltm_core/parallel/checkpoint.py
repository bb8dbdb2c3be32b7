"""Distributed checkpoints (torch.distributed.checkpoint) and their consolidation into a single-device .ckpt.

Layout under OUTPUT_DIR/checkpoints/:
    dcp/step-00000100/     sharded model + optimizer state (every rank writes its shards), train_state.json
    dcp/latest             the name of the newest complete step folder
    last.ckpt              the consolidated single-device checkpoint (Lightning format: `state_dict` with the
                           prefix `model.`, `hyper_parameters["config"]`), loadable by `ltm generate` / `ltm eval`
    best.ckpt              a copy of last.ckpt at the lowest validation loss

Keys are the single-device parameter names (stages keep the original block indices), so a checkpoint resumes on
another dp or pp layout; resharding the tensor-parallel dimension works between tp > 1 layouts (fused
projections are stored [chunks, out / chunks, in] there) and consolidation always writes the canonical shapes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

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
        path = root / marker.read_text().strip()
        if (path / ".metadata").is_file() and (path / "train_state.json").is_file():
            return path
    return None


def _state(parts, optimizers) -> tuple[dict[str, Any], list[dict], list[dict]]:
    models = [get_model_state_dict(p) for p in parts]
    optims = [get_optimizer_state_dict(p, o, options=OPTIM_OPTIONS) for p, o in zip(parts, optimizers)]
    merged_model = {k: v for m in models for k, v in m.items()}
    merged_optim = {k: v for o in optims for k, v in o.items()}
    return {"model": merged_model, "optim": merged_optim}, models, optims


def save(out: Path, step: int, parts, optimizers, train_state: dict[str, Any]) -> Path:
    """Collective: every rank writes its shards; rank 0 then writes train_state.json and the `latest` marker."""
    path = dcp_root(out) / f"step-{step:08d}"
    state, _, _ = _state(parts, optimizers)
    dcp.save(state, checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (path / "train_state.json").write_text(json.dumps(train_state, indent=1))
        tmp = dcp_root(out) / f".latest.{os.getpid()}"
        tmp.write_text(path.name)
        os.replace(tmp, dcp_root(out) / "latest")
        for old in dcp_root(out).glob("step-*"):  # keep the newest only
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(path: Path, parts, optimizers) -> dict[str, Any]:
    """Collective: load the shards of `path` into the parts and optimizers; returns the train state."""
    state, models, optims = _state(parts, optimizers)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # a layout the checkpoint cannot be resharded to, or a damaged checkpoint
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint error: cannot resume from {path} ({detail})") from None
    for part, opt, m, o in zip(parts, optimizers, models, optims):
        set_model_state_dict(part, {k: state["model"][k] for k in m})
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in o}, options=OPTIM_OPTIONS)
    return json.loads((path / "train_state.json").read_text())


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP checkpoint, read in this process alone."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]


def consolidate(path: Path, target: Path, config: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the single-device checkpoint `target` from the DCP checkpoint `path` (no process group needed)."""
    import lightning as L

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
    ckpt = {"epoch": 0, "global_step": int(train_state.get("step", 0)), "pytorch-lightning_version": L.__version__,
            "state_dict": state, "hyper_parameters": {"config": config},
            "samples_seen": int(train_state.get("samples_seen", 0)), "dcp_checkpoint": str(path)}
    ckpt.update(extra or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, target)
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
