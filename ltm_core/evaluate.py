"""Validation loss, perplexity and bits-per-byte of a model on a corpus' validation split."""

from __future__ import annotations

import math

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
