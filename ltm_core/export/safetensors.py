"""The safetensors checkpoint folder: what `ltm export --format safetensors` and `ltm quantize` write, and what
`ltm generate|eval --checkpoint FOLDER`, `load_model` and `InferenceEngine` read back.

    FOLDER/config.json                       {"ltm_config": the run config, "quantization": null or its record}
    FOLDER/model.safetensors                 the weights, named as in the training checkpoint ("model.<module>...")
  or, above the shard size, Hugging Face's sharded layout:
    FOLDER/model-00001-of-0000N.safetensors  ...
    FOLDER/model.safetensors.index.json      {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}

A weight tied to another (the LM head to the embedding) is stored once; loading re-ties it. A quantized folder also
holds each quantized layer's quantization state (bitsandbytes' tensors, e.g. "<layer>.weight.absmax").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ltm_core.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the names that share storage with an earlier one (a tied LM head), contiguous."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split the state, in order, into shards of at most `max_bytes` (a tensor larger than that is a shard alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """model.safetensors, or shards and their index when the weights exceed `max_shard_bytes`."""
    from safetensors.torch import save_file

    state = unique_tensors(state)
    groups = shards(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_folder(folder: Path, state: dict[str, torch.Tensor], run_config: dict[str, Any],
                 quantization: Optional[dict[str, Any]] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Weights (names prefixed "model.", as in a training checkpoint) and config.json into an existing folder."""
    write_weights(folder, {f"model.{k}": v for k, v in state.items()}, max_shard_bytes)
    config = {"ltm_config": run_config, "quantization": quantization}
    (folder / CONFIG).write_text(json.dumps(config, indent=2))


def is_folder_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_folder(path: Path) -> dict[str, Any]:
    """A checkpoint folder (this format, or an `ltm export --format hf` folder) as the dict `read_checkpoint`
    returns for a .ckpt: {"state_dict", "hyper_parameters": {"config"}, "quantization"}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint error: {path / CONFIG} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or "ltm_config" not in config:
        raise CheckpointError(f"checkpoint error: {path / CONFIG} has no ltm_config: not a folder written by "
                              "`ltm export` or `ltm quantize`")
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"checkpoint error: {path} holds neither {WEIGHTS} nor {INDEX}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(path / name)))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint error: {path / name} is not readable safetensors ({exc})") from None
    return {"state_dict": state, "hyper_parameters": {"config": config["ltm_config"]},
            "quantization": config.get("quantization")}


def export_safetensors(checkpoint: str | Path, ckpt: dict[str, Any], out: Path, overwrite: bool = False,
                       max_shard_bytes: Optional[int] = None) -> Path:
    """`ltm export --format safetensors`: the checkpoint's model (quantized or not) as a folder `load_model` reads."""
    from ltm_core.checkpoint import current_run_config, load_model
    from ltm_core.export import output_folder

    model = load_model(checkpoint, ckpt=ckpt)  # the weights fit the config: the folder will load back
    with output_folder(out, overwrite) as staging:
        write_folder(staging, model.state_dict(), current_run_config(ckpt, checkpoint), ckpt.get("quantization"),
                     max_shard_bytes or DEFAULT_SHARD_BYTES)
    return out
