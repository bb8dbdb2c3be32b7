"""The interface every memory kind implements (one subclass per kind, one file each).

A block reads its memory during a segment and writes the segment into it once the segment is complete, so a token
only ever reads what earlier segments wrote. What the block needs from a kind:

    initial_state(B)              the state before any segment
    entries(h)                    what each token writes, from the hidden state the kind writes (`writes`)
    write(state, entries, noise)  one complete segment into the state -> Write(state, aux loss, kept indices)
    prefix(state)                 the read as extra tokens of the self-attention (tokens, neural mac), or None
    read_before(h, state)         the read as a residual before the self-attention (neural mal), or None
    read(h, state)                the read as a residual after the self-attention (slots, delta, neural mag), or None
    scan(state, entries, noise)   the states before each segment of a window, from all its segments' entries

`writes` names the hidden state a segment writes: "normed" (the block's normed input, before any read), "attended"
(the state after the self-attention, before the residual read) or "block" (the block's output). With "normed" or
"attended" the write does not depend on the memory's own read, so a BPTT window runs layer by layer over all its
segments at once (`TitanModel`'s layer-major pass) and only the recurrence itself (`scan`) steps through the
segments; with "block" the window runs segment by segment, as does a kind whose `window_parallel` says so (one that
writes "attended" and is read before the attention, through `prefix` or `read_before`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ltm_core.config import TitanConfig
from ltm_core.memory.state import State, map_state, stack_states

WRITES = ("normed", "attended", "block")


@dataclass
class Write:
    state: State  # the memory after the segment
    aux: Optional[torch.Tensor] = None  # the write's auxiliary training loss (the model adds it to the gradient)
    kept: Optional[torch.Tensor] = None  # [B, M] indices of the candidates kept, for kinds that select (diagnostics)


@dataclass
class Prefix:
    tokens: Optional[torch.Tensor]  # [B, M, C] tokens the self-attention reads beside the segment (through its own
    # projections); None where the caller has their keys and values already (the layer-major pass)
    bias: Optional[torch.Tensor] = None  # [B, M] added to every query's score of each of them
    through: Optional[torch.Tensor] = None  # [B, M] a straight-through weight s of each token's key and value:
    # used unchanged, s gets the gradient of a factor (1 + s - s.detach()) on them (`attention(key_through=)`)


@dataclass
class Scan:
    before: Optional[State]  # the state before each segment, batch B * W (segment i of sample b at b * W + i); None
    # where the kind's read needs only what its scan gives apart (tokens: `importance`, `empty`, `rows`), so the states
    # are not gathered: `Memory.states_before` makes them
    after: State  # the state after the last segment, batch B
    aux: Optional[torch.Tensor]  # [W] each write's auxiliary loss, or None (a kind or mode without one)
    entries: Optional[torch.Tensor] = None  # [B, W, S, D] what the segments wrote
    kept: Optional[torch.Tensor] = None  # [B, W, M] each write's kept candidates, as Write.kept (kinds that select)
    rows: Optional[torch.Tensor] = None  # [B, W, M] for a prefix of kept tokens: the rows, in [row_tokens; the
    # scanned tokens], that the memory before each segment holds (so the keys and values of the scanned tokens are
    # gathered from what the attention projects anyway, not projected again)
    row_tokens: Optional[torch.Tensor] = None  # [B, R, C] the tokens that rows < R name: those held before the
    # scan (and, over several BPTT windows, those held at a later window's start, detached; compiled: each once)
    importance: Optional[torch.Tensor] = None  # [B W, M] (tokens) the importance of each slot of the states before
    # each segment, with the gradients the read gives it
    empty: Optional[torch.Tensor] = None  # [B W, M] bool (tokens) which of those slots are empty
    prefix: Optional[Prefix] = None  # (tokens, scanned compiled on CPU) each segment's read prefix [B W, M], made by
    # the scan instead of `importance` and `empty`


def join_scans(scans: list[Scan], batch_size: int) -> Scan:
    """The scans of consecutive BPTT windows (each from the state the previous one left, detached) as one Scan over
    all their segments (for kinds without `rows`)."""
    if len(scans) == 1:
        return scans[0]
    assert scans[0].rows is None, "a kind whose scan gives rows joins its windows itself (scan_windows)"

    def cat(parts: list, dim: int = 1) -> Optional[torch.Tensor]:  # [B, W_i, ...] -> [B, sum W_i, ...]
        return None if parts[0] is None else torch.cat(parts, dim=dim)

    def before(states: list) -> State:  # batch B W_i each -> batch B sum(W_i), b-major
        first = states[0]
        if isinstance(first, torch.Tensor):
            return torch.cat([s.unflatten(0, (batch_size, -1)) for s in states], dim=1).flatten(0, 1)
        return tuple(before([s[j] for s in states]) for j in range(len(first)))

    return Scan(before([s.before for s in scans]), scans[-1].after, cat([s.aux for s in scans], dim=0),
                cat([s.entries for s in scans]), cat([s.kept for s in scans]))


class Memory(nn.Module):
    """A layer's long-term memory. Subclasses set `kind` and `writes` and implement the methods below."""

    kind: str = ""
    writes: str = "block"

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.model_config = cfg
        self.config = cfg.memory
        self.init_std = cfg.init_std
        self.residual_std = cfg.init_std / (2 * cfg.num_hidden_layers) ** 0.5
        self.backend = cfg.kernels

    @property
    def window_parallel(self) -> bool:
        """Whether a window's segments can run layer by layer at once (the write does not read its own read)."""
        return self.writes != "block"

    def reset_parameters(self) -> None:
        raise TypeError(f"{type(self).__name__} must define reset_parameters")

    def initial_state(self, batch_size: int) -> State:
        raise TypeError(f"{type(self).__name__} must define initial_state")

    def entries(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, T, C] the hidden state named by `writes` -> what each token writes [B, T, D]."""
        return h

    def write(self, state: State, entries: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Write:
        raise TypeError(f"{type(self).__name__} must define write")

    def prefix(self, state: State) -> Optional[Prefix]:
        return None

    def states_before(self, scan: Scan) -> State:
        """The state before each segment of a scan (batch B W), as `write` would leave it (values; a kind may give
        them without gradient)."""
        return scan.before

    def scan_prefix(self, scan: Scan) -> Optional[Prefix]:
        """The prefix each scanned segment reads (batch B W): `prefix` of the states before them; a kind may use
        what its scan computed."""
        return self.prefix(scan.before)

    def read_before(self, h: torch.Tensor, state: State) -> Optional[torch.Tensor]:
        """h: [B, T, C] the block's normed input -> a residual [B, T, C] added before the self-attention, or None."""
        return None

    def read(self, h: torch.Tensor, state: State) -> Optional[torch.Tensor]:
        return None

    def noise_shape(self, batch_size: int, segment_length: int) -> Optional[tuple[int, ...]]:
        """The shape of one write's training noise (drawn once per BPTT window for all its writes), or None."""
        return None

    def scan(self, state: State, entries: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Scan:
        """state (batch B), entries [B, W, S, D] of W complete segments, noise [W, ...] or None -> the states before
        each segment and after the last. This default runs `write` segment by segment; a kind may compute the
        recurrence at once."""
        states, aux, kept = [state], [], []
        for i in range(entries.shape[1]):
            w = self.write(states[-1], entries[:, i], None if noise is None else noise[i])
            states.append(w.state)
            aux.append(w.aux)
            kept.append(w.kept)
        return Scan(stack_states(states[:-1]), states[-1], None if aux[0] is None else torch.stack(aux), entries,
                    None if kept[0] is None else torch.stack(kept, dim=1))

    def scan_windows(self, state: State, entries: torch.Tensor, noise: Optional[torch.Tensor],
                     windows: tuple[int, ...]) -> Scan:
        """`scan` over consecutive BPTT windows of `windows` segments each (entries [B, sum W, S, D]): each window
        starts from the state the previous one left, detached (truncated BPTT), so gradients stop at every window
        boundary. This default scans window by window; a kind may do all at once."""
        scans, start = [], 0
        for n in windows:
            if scans:
                state = map_state(scans[-1].after, torch.Tensor.detach)
            scans.append(self.scan(state, entries[:, start:start + n], None if noise is None else noise[start:start + n]))
            start += n
        return join_scans(scans, entries.shape[0])

    def flops_per_token(self, segment_length: int) -> float:
        """Training FLOPs per token that the memory adds beyond 6 x its parameters (one layer)."""
        return 0.0


class AddLoss(torch.autograd.Function):
    """Identity on x whose backward also differentiates `weight` * `loss` (a scalar) as if it were added to the
    training loss, whenever a backward passes through x: attached to a window's hidden states, the writes' auxiliary
    losses reach the optimiser with the window's backward, in any parallel layout (a pipeline stage's output
    included), without being returned through the model (as Megatron's MoE auxiliary-loss scaler)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full((), ctx.weight, dtype=torch.float32, device=grad.device), None
