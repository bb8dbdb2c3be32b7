"""The evaluation runner: `evaluate_task(model, task_cfg, train_length)` is what `ltm eval task=...` runs.

Every sample is read segment by segment, `model(chunk, memory=state)`, so the state carried is the bounded
`MemoryState` (memory banks plus at most one segment of keys/values) and only one segment of logits exists at a
time: the memory used does not grow with the context length. Answers are decoded greedily, one token at a time
from that state (as `InferenceEngine` does); mqar is scored teacher forced at its query positions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ltm_core.config import TaskConfig
from ltm_core.errors import ConfigError
from ltm_core.memory import MemoryState
from ltm_core.model import TitanModel
from ltm_core.tasks.common import Cell, TaskSample

DEFAULT_MULTIPLES = (1, 4, 16, 64)  # evaluation lengths, as multiples of the training length


@torch.inference_mode()
def prefill(model: TitanModel, tokens: torch.Tensor,
            state: Optional[MemoryState] = None) -> tuple[torch.Tensor, MemoryState]:
    """Read tokens [B, L] one segment at a time -> (logits of the last position [B, V], state after it)."""
    seg = model.config.segment_length
    logits = None
    for start in range(0, tokens.shape[1], seg):
        out = model(tokens[:, start:start + seg], memory=state)
        logits, state = out.logits[:, -1], out.memory
    return logits, state


@torch.inference_mode()
def greedy_decode(model: TitanModel, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """prompt [B, L] -> the next `max_new_tokens` greedy tokens [B, n], from the streamed state."""
    logits, state = prefill(model, prompt)
    tokens = []
    for i in range(max_new_tokens):
        token = logits.argmax(dim=-1)  # [B]
        tokens.append(token)
        if i + 1 < max_new_tokens:
            out = model(token.unsqueeze(1), memory=state)
            logits, state = out.logits[:, -1], out.memory
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def teacher_forced_argmax(model: TitanModel, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """The model's argmax prediction of tokens[:, p] from tokens[:, :p], for each p in `positions` -> [B, P].
    Streams the sequence segment by segment and keeps only the logits it needs."""
    seg = model.config.segment_length
    wanted = np.asarray(positions) - 1  # logits at p - 1 predict token p
    predictions = torch.empty(tokens.shape[0], len(wanted), dtype=torch.long, device=tokens.device)
    state = None
    for start in range(0, int(wanted.max()) + 1, seg):
        out = model(tokens[:, start:start + seg], memory=state)
        state = out.memory
        inside = np.nonzero((wanted >= start) & (wanted < start + seg))[0]
        if len(inside):
            predictions[:, inside] = out.logits[:, wanted[inside] - start].argmax(dim=-1)
    return predictions


def stack(samples: Sequence[TaskSample], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.tokens for s in samples])).to(device)


def decode_answers(model: TitanModel, samples: Sequence[TaskSample], max_new_tokens: int) -> list[str]:
    """Greedy continuation text of each sample's prompt (tokens before its answer); samples whose prompts have
    the same length are decoded as one batch."""
    from ltm_core.tokenizer import ByteTokenizer

    device = next(model.parameters()).device
    texts = [""] * len(samples)
    groups: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.answer_start, []).append(i)
    for start, members in groups.items():
        prompts = stack([samples[i] for i in members], device)[:, :start]
        generated = greedy_decode(model, prompts, max_new_tokens)
        for i, ids in zip(members, generated.tolist()):
            texts[i] = ByteTokenizer().decode(ids)
    return texts


def default_lengths(train_length: int) -> list[int]:
    return [m * train_length for m in DEFAULT_MULTIPLES]


def cell_samples(task, cell: Cell, cfg: TaskConfig, segment_length: int, index: Sequence[int]) -> list[TaskSample]:
    """Samples `index` of `cell`, as `evaluate_task` scores them: L + 1 tokens for context length L (L inputs, as in
    training; its docstring), laid out for `segment_length`."""
    sized = dataclasses.replace(cell, length=cell.length + 1)
    return [task.make(cell.rng(cfg.seed, i), sized, cfg, segment_length) for i in index]


def evaluate_task(model: TitanModel, cfg: TaskConfig, train_length: int,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Evaluate `model` on the task grid of `cfg` (lengths x depth bins, or lengths x pairs, ...).

    A cell of length L is scored on samples of L + 1 tokens: the model reads the L tokens before the answer's
    last token, exactly as a training sample of data.seq_len + 1 tokens gives data.seq_len inputs. At 1x the
    question then sits where it sat in training relative to the segment boundaries (a model may depend on it).

    Returns {"task", "train_length", "segment_length", "seed", "filler", "lengths", "rows": [...]}, one row per
    cell: {"length", "depth", "pairs", "placement", "samples", "exact_match", ...task metrics}.
    `progress(done, total, label)` is called as each batch of samples is scored (`done` of the grid's `total`
    samples; `label` the cell: "length 4,096, depth 0.35 (cell 7/44)").
    """
    from ltm_core.tasks import get_task

    cfg.validate()
    task = get_task(cfg.name)
    seg = cfg.layout(model.config.segment_length)  # what the samples are laid out for
    lengths = list(cfg.lengths) if cfg.lengths else default_lengths(train_length)
    cells = task.cells(cfg, lengths, seg)
    for length in lengths:  # a length no cell can be scored at is a mistake, not an empty row of the table
        skipped = [c for c in cells if c.length == length]
        if all(c.skip for c in skipped):  # named by the setting to change (`Cell.skip_key`)
            keys = {c.skip_key for c in skipped}
            key = keys.pop() if len(keys) == 1 else "task.lengths"
            raise ConfigError(key, f"no {cfg.name} sample fits in {length} tokens ({skipped[0].skip})")
    model.eval()
    rows = []
    total, done = cfg.samples * sum(not c.skip for c in cells), 0
    for number, cell in enumerate(cells, 1):
        where = "".join(f", {k} {v}" for k, v in cell.row().items()
                        if k != "length" and v is not None and not (k == "placement" and v == "depth"))
        label = f"length {cell.length:,}{where} (cell {number}/{len(cells)})"
        if cell.skip:
            row = {**cell.row(), "samples": 0, "exact_match": None, "skipped": cell.skip}
        else:
            tick = time.perf_counter()
            scores: dict[str, list[float]] = {}
            for first in range(0, cfg.samples, cfg.batch_size):
                if progress is not None:
                    progress(done, total, label)
                samples = cell_samples(task, cell, cfg, seg, range(first, min(first + cfg.batch_size, cfg.samples)))
                for key, values in task.score(model, samples).items():
                    scores.setdefault(key, []).extend(values)
                done += len(samples)
            row = {**cell.row(), "samples": cfg.samples, **{k: float(np.mean(v)) for k, v in scores.items()},
                   "seconds": round(time.perf_counter() - tick, 2)}
        rows.append(row)
    if progress is not None:
        progress(done, total, "")
    return {"task": cfg.name, "train_length": train_length, "segment_length": model.config.segment_length,
            "seed": cfg.seed,
            "filler": task.filler(cfg), "lengths": lengths, "memory": bool(model.config.use_memory),
            "sample_settings": {k: getattr(cfg, k) for k in (*SAMPLE_KEYS, "filler_start")}, "rows": rows}


# how samples are made, carried from the checkpoint into `ltm eval` (filler_start is recorded, not carried: a run
# trained on random starts is evaluated on RULER's text as is)
SAMPLE_KEYS = ("digits", "filler", "train_pairs", "gap_segments", "key_length", "facts", "names", "layout_segment")
GRID_KEYS = ("pairs", "depth_bins")  # the evaluation grid a recipe sets (mqar's pair counts), also carried


def eval_task_config(stored: dict, overrides: Sequence[str]) -> TaskConfig:
    """The task config of `ltm eval --checkpoint CKPT [task=NAME] [task.key=value ...]`.

    The task is `task=NAME`, else the task the checkpoint was trained on. When the checkpoint was trained on that
    task, its sample settings (digits, facts, ...) and evaluation grid (pairs, depth bins) are the starting point;
    `task.*` overrides come last.
    """
    from ltm_core.configuration import compose, override_key, to_dict
    from ltm_core.tasks import is_task

    given = [o for o in overrides if override_key(o).split(".")[0] == "task"]
    names = [o.split("=", 1)[1] for o in given if override_key(o) == "task"]
    trained_on = stored.get("data", {}).get("name")
    name = names[-1] if names else (trained_on if is_task(trained_on) else None)
    if name is None:
        raise ConfigError("task", "name the task to evaluate: task=passkey | task=mqar | task=babi_facts")
    args = [f"task={name}"]
    stored_task = stored.get("task") or {}
    if stored_task.get("name") == name:
        args += [f"task.{k}={stored_task[k]}" for k in (*SAMPLE_KEYS, *GRID_KEYS) if stored_task.get(k) is not None]
    args += [o for o in given if override_key(o) != "task"]
    from ltm_core.migration import migrate_model_config

    backbone = migrate_model_config(dict(stored["model"]))  # the task is validated against the model's segments
    model_args = [f"model.{k}={v}" for k, v in backbone.items() if v is not None and k != "memory"]
    return TaskConfig(**to_dict(compose(args + model_args).task))
