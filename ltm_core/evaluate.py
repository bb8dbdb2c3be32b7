"""Validation loss, perplexity and bits-per-byte of a model on a corpus' validation split."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader

from ltm_core.config import DataConfig
from ltm_core.data import Corpus, EvenWindows, load_corpus
from ltm_core.model import TitanModel


@torch.inference_mode()
def evaluate(model: TitanModel, data: DataConfig, corpus: Corpus | None = None) -> dict[str, float]:
    """Mean next-token loss over `data.val_samples` windows of `data.seq_len` tokens spread over the validation
    split. Tokens are bytes, so bits per byte = loss / ln 2."""
    corpus = corpus if corpus is not None else load_corpus(data)
    device = next(model.parameters()).device
    loader = DataLoader(EvenWindows(corpus.val, data.seq_len, data.val_samples), batch_size=data.batch_size)
    total, count = 0.0, 0
    for input_ids, labels in loader:
        out = model(input_ids.to(device), labels=labels.to(device))
        total += float(out.loss) * labels.numel()
        count += labels.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss / math.log(2), "tokens": float(count)}


def eval_data(stored: dict[str, Any], overrides: Iterable[str] = (), segment_length: int | None = None) -> DataConfig:
    """The data `ltm eval` / `ltm quantize` measure on: the checkpoint's own (`stored`, its run config), or the one
    that `data=...` / `data.key=value` overrides compose (data.seq_len defaults to 4 segments of `segment_length`,
    the model's)."""
    from ltm_core.configuration import compose, to_dict

    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~").split(".")[0] == "data" for o in overrides):
        return DataConfig(**stored["data"])
    segment = [f"model.segment_length={segment_length or stored['model']['segment_length']}"]
    return DataConfig(**to_dict(compose([o for o in overrides if not o.startswith("model.")] + segment).data))
