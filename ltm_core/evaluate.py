"""Validation loss, perplexity and bits-per-byte of a model on a corpus' validation split."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils.data import DataLoader

from ltm_core.config import DataConfig
from ltm_core.data import Corpus, EvenWindows, load_corpus
from ltm_core.model import TitanModel


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
    """The data `ltm eval` / `ltm quantize` measure on: the checkpoint's own (`stored`, its run config), or the one
    that `data=...` / `data.key=value` overrides compose (data.seq_len defaults to 4 segments of `segment_length`,
    the model's)."""
    from ltm_core.configuration import compose, to_dict

    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~").split(".")[0] == "data" for o in overrides):
        return DataConfig(**stored["data"])
    segment = [f"model.segment_length={segment_length or stored['model']['segment_length']}"]
    return DataConfig(**to_dict(compose([o for o in overrides if not o.startswith("model.")] + segment).data))
