"""Validation loss, perplexity and bits-per-byte of a model on a corpus' validation split, overall and by token
position inside the sample (`loss_by_position`: does a later segment profit from what came before?)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ltm_core.config import DataConfig
from ltm_core.data import Corpus, EvenWindows, load_corpus
from ltm_core.errors import ConfigError
from ltm_core.model import TitanModel

FIRST_SEGMENT_BINS = 8  # the first segment is split in 8 bins, the second in 4, the third in 2, later ones in 1


@torch.inference_mode()
def evaluate(model: TitanModel, data: DataConfig, corpus: Corpus | None = None,
             progress: Optional[Callable[[int, int, str], None]] = None) -> dict[str, float]:
    """Mean next-token loss over `data.val_samples` windows of `data.seq_len` tokens spread over the validation
    split. Tokens are bytes, so bits per byte = loss / ln 2. progress(done, total, label): windows scored."""
    corpus = corpus if corpus is not None else load_corpus(data)
    device = next(model.parameters()).device
    loader = DataLoader(EvenWindows(corpus.val, data.seq_len, data.val_samples), batch_size=data.batch_size)
    total, count, windows = 0.0, 0, len(loader.dataset)
    for input_ids, labels in loader:
        if progress is not None:
            progress(count // data.seq_len, windows, f"{data.seq_len:,}-token windows")
        out = model(input_ids.to(device), labels=labels.to(device))
        total += float(out.loss) * labels.numel()
        count += labels.numel()
    if progress is not None:
        progress(windows, windows, "")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss / math.log(2), "tokens": float(count)}


def eval_data(stored: dict[str, Any], overrides: Iterable[str] = (), segment_length: int | None = None) -> DataConfig:
    """The data `ltm eval` / `ltm quantize` measure on: the checkpoint's own (`stored`, its run config) with
    `data.key=value` overrides applied (e.g. data.seq_len=2048, data.val_samples=512); or another corpus,
    `data=NAME ...`, composed for the model's segment length (`segment_length`, default the stored one; data.seq_len
    defaults to 4 of its segments).

    data.seq_len may be any positive length, a whole number of segments or not: the model reads a last partial
    segment exactly as the first tokens of a whole one (causal attention inside the segment, the memory written by
    the segments before; the write it would make at the segment's end comes after every token scored), so a window
    of 100 tokens scores what the first 100 tokens of a longer window score. `ltm train`'s whole-segment rule is about
    its training windows (the BPTT windows, the memory writes), not about reading."""
    from ltm_core.configuration import compose, override_key, to_dict
    from ltm_core.tasks import is_task

    overrides = list(overrides)
    keys = [override_key(o) for o in overrides]
    changes = [o for o, k in zip(overrides, keys) if k.startswith("data.")]
    if "data" in keys:  # another corpus: composed (and checked) as `ltm train` would, but for its length
        segment = [f"model.segment_length={segment_length or stored['model']['segment_length']}"]
        length = [o for o, k in zip(overrides, keys) if k == "data.seq_len"]
        rest = [o for o, k in zip(overrides, keys) if k != "data.seq_len" and not k.startswith("model.")]
        return _with_changes(DataConfig(**to_dict(compose(rest + segment).data)), length)
    if is_task(stored["data"]["name"]):
        raise ConfigError("data", f"the checkpoint was trained on task {stored['data']['name']}: choose text with "
                                  "data=kjv|pystdlib|textfile")
    return _with_changes(DataConfig(**stored["data"]), changes)


def _with_changes(data: DataConfig, changes: list[str]) -> DataConfig:
    """`data` with `data.key=value` overrides applied, each checked (one line naming the key)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ltm_core.configuration import config_error

    if not changes:
        return data
    try:
        merged = OmegaConf.merge(OmegaConf.structured(data),
                                 OmegaConf.from_dotlist([o.lstrip("+~")[len("data."):] for o in changes]))
    except OmegaConfBaseException as exc:
        err = config_error(exc)
        raise ConfigError(f"data.{err.key}", err.detail) from None
    data = DataConfig(**OmegaConf.to_container(merged))
    for key in ("seq_len", "val_samples", "batch_size"):
        if not isinstance(getattr(data, key), int) or getattr(data, key) <= 0:
            raise ConfigError(f"data.{key}", f"must be a positive integer, got {getattr(data, key)!r}")
    return data


def position_bins(seq_len: int, segment_length: int, first_bins: int = FIRST_SEGMENT_BINS) -> list[tuple[int, int]]:
    """Bins [start, end) of the token positions 0..seq_len-1: segment i (of `segment_length` tokens) is split in
    max(1, first_bins / 2^i) equal parts, so the first segments, where the loss moves fastest, are seen in detail,
    and every segment has at least one bin of its own (no bin crosses a segment boundary)."""
    if seq_len <= 0 or segment_length <= 0:
        raise ConfigError("data.seq_len", f"positions need a positive length and segment, got {seq_len}, "
                                          f"{segment_length}")
    bins = []
    for i, start in enumerate(range(0, seq_len, segment_length)):
        end = min(start + segment_length, seq_len)
        parts = min(max(1, first_bins >> i), end - start)
        edges = [start + (end - start) * k // parts for k in range(parts + 1)]
        bins.extend(zip(edges[:-1], edges[1:]))
    return bins


@torch.inference_mode()
def position_losses(model: TitanModel, data: DataConfig, corpus: Corpus | None = None) -> tuple[torch.Tensor, int]:
    """The mean next-token loss at each position of the sample [seq_len] (float64), over the `data.val_samples`
    validation windows `evaluate` reads, each read from an empty memory; and the number of windows."""
    corpus = corpus if corpus is not None else load_corpus(data)
    device = next(model.parameters()).device
    windows = EvenWindows(corpus.val, data.seq_len, data.val_samples)
    total = torch.zeros(data.seq_len, dtype=torch.float64)
    for input_ids, labels in DataLoader(windows, batch_size=data.batch_size):
        logits = model(input_ids.to(device)).logits  # [B, L, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), reduction="none")
        total += loss.view(labels.shape).double().sum(dim=0).cpu()  # [L]
    return total / len(windows), len(windows)


def loss_by_position(model: TitanModel, data: DataConfig, corpus: Corpus | None = None,
                     segment_length: Optional[int] = None) -> dict:
    """The validation loss per token-position bin (`position_bins` over segments of `segment_length`, default the
    model's: pass the smallest segment of several models to compare them bin for bin). Returns the overall loss
    and bits/byte (equal to `evaluate`'s on the same windows), one row per segment and one per bin."""
    per_position, windows = position_losses(model, data, corpus)
    segment = segment_length or model.config.segment_length
    L = data.seq_len

    def row(start: int, end: int) -> dict:
        loss = float(per_position[start:end].mean())
        return {"start": start, "end": end, "segment": start // segment, "loss": loss, "bpb": loss / math.log(2)}

    loss = float(per_position.mean())
    cfg = model.config
    return {"seq_len": L, "bin_segment": segment, "windows": windows, "tokens": windows * L,
            "segment_length": cfg.segment_length, "memory": cfg.memory_kind,
            "parameters": model.num_parameters(), "loss": loss, "bpb": loss / math.log(2),
            "segments": [row(s, min(s + segment, L)) for s in range(0, L, segment)],
            "bins": [row(s, e) for s, e in position_bins(L, segment)]}
