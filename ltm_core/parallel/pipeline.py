"""Pipeline parallelism with torch.distributed.pipelining, split by module names (torchtitan style).

Every stage is a `StageModel` holding the TitanModel submodules it owns under their original names
(`embed_tokens` on the first stage, `blocks.<i>` for its layers, `norm` and `lm_head` on the last), so its
state-dict keys are those of the single-device model and checkpoints are layout-independent.

The recurrent memory: a stage keeps, per microbatch, the `MemoryState` of its own layers. A batch is processed
window by window (`segment_length × bptt_segments` tokens, one `schedule.step` each, whatever `windows_per_pass`
says: the stages' shapes are fixed); inside a window gradients
flow through the memory writes, between windows the state is carried detached - the same truncated BPTT as
`ltm_core.training.windowed_backward`. Schedules run the forwards of one stage in microbatch order, so the k-th
forward call of a window is microbatch k.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core.memory import MemoryState
from ltm_core.model import SegmentRecurrence, TitanModel, compile_window


class Blocks(nn.ModuleDict):
    """The blocks of one stage keyed by their global index; iterates over the blocks like a ModuleList."""

    def __iter__(self):
        return iter(self.values())


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges (the first stages take one more when it does not divide)."""
    base, extra = divmod(num_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Loop-style placement: rank r holds stages r, r + pp, ... (the interleaved schedule's layout)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class StageModel(SegmentRecurrence):
    """One pipeline stage (or, with every layer, the whole model) of a TitanModel."""

    def __init__(self, model: TitanModel, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.embed_tokens = model.embed_tokens if first else None
        self.blocks = Blocks({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.is_first, self.is_last = first, last
        self.microbatches = 1
        self._calls = 0
        self._states: dict[int, MemoryState] = {}
        self._compiled_window = compile_window(self)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def reset(self, clear_memory: bool) -> None:
        """Before a window (clear_memory=False) or a new batch (True)."""
        self._calls = 0
        if clear_memory:
            self._states = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids [b, L]; others: hidden states [b, L, C]. Last stage returns logits."""
        mb = self._calls % self.microbatches
        self._calls += 1
        state: Optional[MemoryState] = self._states.get(mb)
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        if state is None:
            state = self.initial_state(x.shape[0])
        h, state, _ = self.run_blocks(x, state)  # TitanModel's own recurrence over this stage's blocks
        self._states[mb] = state.detach()
        if self.lm_head is not None:
            return self.lm_head(self.norm(h))
        return h


def pipeline_loss(ctx: dict):
    """The schedule's loss function: the summed token cross-entropy of a microbatch times `ctx["scale"]`
    (1 / tokens of the whole batch, as in windowed_backward); the unscaled sums are collected in `ctx["sums"]`."""

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                   reduction="sum")
        ctx["sums"].append(loss_sum.detach())
        return loss_sum * ctx["scale"]

    return loss_fn


def build_schedule(stages: list, schedule: str, microbatches: int, loss_fn):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
