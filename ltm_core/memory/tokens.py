"""`tokens`: the memory keeps the M most important whole tokens seen so far, and the self-attention reads them.

Per layer, an entry is a token as the self-attention sees it, its normed input a = norm(x) [C] (no compression).
After each segment the write keeps, among the memory's M entries and the segment's S tokens, the M with the highest
importance w . a + b, in arrival order:

    cand = [mem; a_1..S]                                     [B, M + S, C]
    mem  = the M entries of cand with the highest w . cand   [B, M, C]

An entry leaves only when M more important tokens have arrived, so retention does not depend on the distance. The
self-attention reads the kept tokens through its own key and value projections, beside the segment's keys (the
slots carry no position):

    keys = [W_k mem ; rope(W_k a_1..T)],  values = [W_v mem ; W_v a_1..T]

the attention the model would do if the kept tokens were still in its window: a KV cache of the important tokens,
as Memorizing Transformers attend to retrieved past keys and values. The memory starts empty (zeros): empty slots
are masked out of the read and lose to any token in the write.

How the ranking learns (the ranking itself has no gradient):
- the read multiplies each kept token by 1 + s - s.detach() (= 1), s = sigmoid(w . entry): the value is unchanged
  and the importance learns how useful each kept entry was to the reads (a straight-through factor);
- `read_importance` adds log sigmoid(w . entry) to each kept token's attention scores (the `key_bias` of
  `attention()`), so the read prefers what the write ranks high and the importance learns from every read;
- `importance_penalty` = lambda adds lambda * mean_t sigmoid(w . a_t) over each written segment's tokens to the
  training loss (the write's auxiliary loss; the model counts it when a later read in the window uses the write),
  so tokens no read holds up sink in the ranking; with `importance_detach` it trains w and b only;
- `select_noise` = tau: in training the ranking is w . cand + tau * std(w . cand) * Gumbel noise (Gumbel-top-k:
  M entries sampled without replacement), so tokens the ranking would drop are sometimes kept and the ranking
  learns from them; evaluation and generation rank without noise;
- `select_dedup` = rho ranks a candidate whose cosine similarity to a higher-ranked one exceeds rho after every
  distinct one (near-duplicate suppression, as Fast NMS): a repeating text cannot fill the slots with copies.

The ranking is computed in float64 from the entries alone, so the sequential path and the layer-major window
(`scan`, which ranks all of a window's writes from one pool of its tokens) make the same choices.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm_core.config import TitanConfig
from ltm_core.layers import constant_tensors, gather_rows
from ltm_core.memory.base import Memory, Prefix, Scan, Write
from ltm_core.ops import use_cpu_kernels

EMPTY_SLOT_SCORE = -1e3  # added to an empty slot's read scores (exp(-1000) = 0 in any precision)
VACANT_RANK = 1e4  # subtracted from an empty slot's rank: any token beats it


@constant_tensors
def window_index(windows: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """BPTT windows of `windows` segments -> (the first segment of each window [G], the window of each segment and
    of the state after the last one, the last window's [W + 1]). Made once per (windows, device): on CUDA a tensor
    made from a Python list is a copy from pageable memory, which waits for the GPU's queued work."""
    G = len(windows)
    starts = torch.tensor([sum(windows[:g]) for g in range(G)], device=device)
    window = torch.tensor([g for g, n in enumerate(windows) for _ in range(n)] + [G - 1], device=device)
    return starts, window


class TokensMemory(Memory):
    kind = "tokens"
    writes = "normed"

    def __init__(self, cfg: TitanConfig):
        super().__init__(cfg)
        self.slots = self.config.slots
        self.importance = nn.Linear(cfg.hidden_size, 1)  # w, b

    def reset_parameters(self) -> None:
        nn.init.normal_(self.importance.weight, std=self.init_std)
        nn.init.zeros_(self.importance.bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.importance.weight.new_zeros(batch_size, self.slots, self.importance.in_features)  # [B, M, C]

    def noise_shape(self, batch_size: int, segment_length: int) -> Optional[tuple[int, ...]]:
        return (batch_size, self.slots + segment_length) if self.config.select_noise > 0 else None

    @staticmethod
    def empty(mem: torch.Tensor) -> torch.Tensor:
        """mem: [B, M, C] -> [B, M] bool: the slots no token has filled yet (all zeros; a max-reduction, 4x faster on
        CPU than all() over a comparison)."""
        return mem.detach().abs().amax(dim=-1) == 0

    def ranks(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., C] -> the importance w . x + b that ranks it [...], in float64, without gradient."""
        w, b = self.importance.weight.detach().double(), self.importance.bias.detach().double()
        return (x.detach().double() * w[0]).sum(-1) + b[0]

    def shared_by_heads(self, t: torch.Tensor) -> torch.Tensor:
        """A replicated tensor that every head's read uses (the read bias and the straight-through factor). Under tensor parallelism a rank holds only its heads,
        so the gradient is summed over the tp group there (`apply_tensor_parallel` replaces this identity)."""
        return t

    # ------------------------------------------------------------------------------------------------ write
    def keep(self, ranks: torch.Tensor, vacancy: torch.Tensor, gumbel: Optional[torch.Tensor],
             candidates: Optional[torch.Tensor]) -> torch.Tensor:
        """The candidates one write keeps: ranks [B, M + S] (the memory's M entries, then the segment's S tokens),
        vacancy [B, M + S] (VACANT_RANK for an empty slot, else 0), gumbel [B, M + S] standard Gumbel samples or None,
        candidates [B, M + S, C] (for select_dedup) -> indices [B, M] into the candidates, in arrival order."""
        rank = ranks
        if gumbel is not None:  # Gumbel-top-k: sample M entries without replacement
            scale = self.config.select_noise * rank.std(dim=1, keepdim=True)  # [B, 1]: relative to the spread
            rank = rank + scale * gumbel
        rank = rank - vacancy
        if self.config.select_dedup is not None:
            rank = self._suppress_duplicates(candidates, rank)
        return rank.topk(self.slots, dim=1).indices.sort(dim=1).values  # [B, M]

    def _suppress_duplicates(self, candidates: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """candidates [B, N, C], rank [B, N] -> rank with every candidate whose cosine similarity to a higher-ranked
        one exceeds select_dedup moved below all the others, in its order (Fast NMS: a candidate suppressed by one
        that is itself suppressed stays suppressed). Equal ranks: the earlier candidate counts as higher."""
        u = F.normalize(candidates.detach().double(), dim=-1)
        similar = u @ u.transpose(1, 2) > self.config.select_dedup  # [B, N, N]
        i = torch.arange(rank.shape[1], device=rank.device)
        higher = (rank.unsqueeze(1) > rank.unsqueeze(2)) | ((rank.unsqueeze(1) == rank.unsqueeze(2))
                                                            & (i.unsqueeze(0) < i.unsqueeze(1)))  # [B, i, j]: j above i
        duplicate = (similar & higher).any(dim=2)  # [B, N]
        spread = rank.amax(dim=1, keepdim=True) - rank.amin(dim=1, keepdim=True) + 1  # [B, 1]
        return rank - duplicate * spread

    @staticmethod
    def gumbel(noise: torch.Tensor) -> torch.Tensor:
        """noise: standard exponential samples (the model draws them) -> standard Gumbel samples -log(noise) (fp64)."""
        return -noise.double().log()

    def penalizes(self) -> bool:
        """Whether the writes have an auxiliary loss now (`penalty`): training, with gradients, a positive weight."""
        return self.training and torch.is_grad_enabled() and self.config.importance_penalty > 0

    def penalty(self, tokens: torch.Tensor, z: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """tokens: [..., S, C] written segments -> importance_penalty * mean sigmoid(importance) per segment [...]
        (training with gradients only; None otherwise). z [..., S]: the tokens' importance when already computed,
        with the gradients this gives it (to w and b only under importance_detach)."""
        if not self.penalizes():
            return None
        if z is None:
            z = self.importance(tokens.detach() if self.config.importance_detach else tokens).squeeze(-1)
        return self.config.importance_penalty * torch.sigmoid(z.float()).mean(dim=(0, -1))

    def write(self, state: torch.Tensor, entries: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Write:
        """state: [B, M, C], entries: [B, S, C] one complete segment -> the M entries kept, in arrival order."""
        candidates = torch.cat([state, entries.to(state.dtype)], dim=1)  # [B, M + S, C]
        held, keeps, _ = self.choose(candidates, entries.shape[1], None if noise is None else noise.unsqueeze(0))
        return Write(gather_rows(candidates, held[:, 1]), self.penalty(entries), keeps[:, 0])

    def compiled_loops(self, t: torch.Tensor) -> bool:
        """Whether the writes' loop and a scan's bookkeeping run compiled (`ltm_core.memory.choice`) for tensors like
        t: on CPU, outside torch.compile, unless `model.kernels=torch`."""
        return t.device.type == "cpu" and self.model_config.kernels != "torch" and not torch.compiler.is_compiling()

    def choose(self, pool: torch.Tensor, segment: int, noise: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The choices of W writes in a row, from one pool of candidates: pool [B, P = M + W S, C] (the M entries
        held before the first write, then the W segments of S = `segment` tokens, in order), noise [W, B, M + S]
        the writes' training noise or None -> (held [B, W + 1, M]: the pool rows held before each write and after
        the last; keeps [B, W, M]: each write's kept candidates, indices into [held; segment]; empty [B, W + 1, M]:
        which held rows are empty slots, all zeros, which the read masks). Every write only
        chooses indices, from ranks computed once. On CPU (outside torch.compile, without select_dedup, unless
        `model.kernels=torch`) the loop runs compiled (`ltm_core.memory.choice`, which ranks the pool, flags its
        empty slots and draws the Gumbel samples itself); this PyTorch loop is its reference, and runs everywhere
        else."""
        B, P, _ = pool.shape
        M, S = self.slots, segment
        W = (P - M) // S
        dedup = self.config.select_dedup is not None
        if self.compiled_loops(pool) and not dedup:
            from ltm_core.memory import choice

            return choice.choose(pool[:, :M], pool[:, M:], self.importance.weight[0], self.importance.bias, noise,
                                 self.config.select_noise, VACANT_RANK, S)
        ranks, gumbel = self.ranks(pool), None if noise is None else self.gumbel(noise)  # [B, P], [W, B, M + S]
        empty = self.empty(pool)  # [B, P]: an all-zero row is an empty slot once held
        vacancy = VACANT_RANK * empty.double()
        index = torch.arange(M, device=pool.device).expand(B, M)  # [B, M] pool rows held by the memory
        segments = torch.arange(M, P, device=pool.device).view(1, W, S).expand(B, W, S)  # pool rows
        no_vacancy = ranks.new_zeros(B, S)  # a candidate token is never vacant
        held, keeps = [index], []
        for i in range(W):
            candidates = torch.cat([index, segments[:, i]], dim=1)  # [B, M + S] pool rows
            rows = gather_rows(pool, candidates) if dedup else None
            held_vacancy = torch.cat([vacancy.gather(1, index), no_vacancy], dim=1)  # [B, M + S]
            keep = self.keep(ranks.gather(1, candidates), held_vacancy, None if gumbel is None else gumbel[i], rows)
            index = candidates.gather(1, keep)
            held.append(index)
            keeps.append(keep)
        held = torch.stack(held, dim=1)  # [B, W + 1, M]
        return held, torch.stack(keeps, dim=1), empty.gather(1, held.flatten(1)).view_as(held)

    def scan(self, state: torch.Tensor, entries: torch.Tensor, noise: Optional[torch.Tensor] = None) -> Scan:
        """The W writes of one window at once (see `scan_windows`)."""
        return self.scan_windows(state, entries, noise, (entries.shape[1],))

    def scan_windows(self, state: torch.Tensor, entries: torch.Tensor, noise: Optional[torch.Tensor],
                     windows: tuple[int, ...]) -> Scan:
        """The writes of W segments in BPTT windows of `windows` segments, at once: every write only chooses indices
        into one pool of candidates (the memory before the scan, then the tokens in order), from ranks computed
        once. Makes exactly the choices of W calls of `write`. The memories before each segment are not gathered
        (`Scan.before` is None; `states_before` makes them): what the read takes of them is their importance with
        its gradients (`Scan.importance`, scored once per pool row), their empty slots (`Scan.empty`) and their keys
        and values (`rows`). A token kept from before its reader's window is read detached (truncated BPTT): its
        importance from the pool's detached copy, its keys and values as one of the tokens held at that window's
        start (`row_tokens`). On CPU in float32 (`compiled_scan`) the read's prefix itself is made here
        (`Scan.prefix`; `_scan_compiled`)."""
        B, M, C = state.shape
        W, S = entries.shape[1], entries.shape[2]
        if self.compiled_scan(state) and entries.dtype == state.dtype:
            return self._scan_compiled(state, entries, noise, windows)
        pool = torch.cat([state, entries.flatten(1, 2).to(state.dtype)], dim=1)  # [B, P = M + W S, C]
        kept, keeps, empty = self.choose(pool, S, noise)  # [B, W + 1, M] (before each segment, then after the
        # last), [B, W, M], [B, W + 1, M]
        held = kept[:, :W].flatten(1)  # [B, W M]
        own = rows = later = None  # one window: every memory reads its tokens with their gradient
        if len(windows) > 1:
            own, rows, later = self.window_rows(kept, S, windows)
        importance, after, aux = self._held_scores(pool, entries, held, kept[:, W], own)
        if len(windows) == 1:
            return Scan(None, after, aux, entries, keeps, kept[:, :W], state, importance.view(B * W, M),
                        empty[:, :W].flatten(0, 1))
        # rows for the read's keys and values: [the state as it is; the tokens held at later windows' starts,
        # detached; the scanned tokens]
        row_tokens = torch.cat([state, gather_rows(pool.detach(), later)], dim=1)  # [B, M + U, C]
        return Scan(None, after, aux, entries, keeps, rows, row_tokens, importance.view(B * W, M),
                    empty[:, :W].flatten(0, 1))

    def compiled_scan(self, t: torch.Tensor) -> bool:
        """Whether a scan of tensors like t runs compiled (`_scan_compiled`): the loops compiled (`compiled_loops`),
        in float32, without select_dedup."""
        return (self.compiled_loops(t) and use_cpu_kernels(t, self.model_config.kernels)
                and self.importance.weight.dtype == torch.float32 and self.config.select_dedup is None)

    def _scan_compiled(self, state: torch.Tensor, entries: torch.Tensor, noise: Optional[torch.Tensor],
                       windows: tuple[int, ...]) -> Scan:
        """`scan_windows` on CPU in float32: one compiled pass each way (`_CompiledScan`), the forward's with the
        choices (the compiled loops of `ltm_core.memory.choice`) and each segment's read prefix (`Scan.prefix`),
        where the reference keeps the held rows' importance and empty slots for `prefix`; the pool [state; entries]
        is never copied into one tensor."""
        from ltm_core.memory import choice

        B, W, S, _ = entries.shape
        M, w, b = self.slots, self.importance.weight, self.importance.bias
        penalty = self.config.importance_penalty if self.penalizes() else 0.0
        bias, through, after, aux, row_tokens, keeps, rows = _CompiledScan.apply(
            state, entries.flatten(1, 2), w, b, choice.gumbel_source(noise, self.config.select_noise),
            choice.window_layout(windows, M, S), S, penalty, self.config.importance_detach and penalty > 0,
            self.config.read_importance)  # [B W, M] twice, [B, M, C], [W], [B, M + U, C], [B, W, M] twice
        prefix = Prefix(None, self.shared_by_heads(bias), self.shared_by_heads(through))
        return Scan(None, after, aux if penalty else None, entries, keeps, rows, row_tokens, prefix=prefix)

    def _held_scores(self, pool: torch.Tensor, entries: torch.Tensor, held: torch.Tensor, last: torch.Tensor,
                     own: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """A scan's differentiable part: pool [B, P, C] (the M held rows, then the entries [B, W, S, C]), held [B, W
        M] the rows held before each segment, last [B, M] those after the last, own [B, W + 1, M] which of them are
        read with their gradient (None: all) -> (their importance [B, W M], the state after [B, M, C], the writes'
        penalty [W] or None). Every pool row's importance is scored once; a row held over from an earlier BPTT window
        gives its importance's gradient to w and b only, and its value none (truncated BPTT), as do the penalty's
        tokens under importance_detach. With `prefix`'s ops, the reference of `_CompiledScan`."""
        B, W, S, _ = entries.shape
        M = last.shape[1]
        detach = self.config.importance_detach and self.penalizes()
        z = self.importance(pool).squeeze(-1)  # [B, P]: with gradients to w, b and the row
        # and to w, b only: the rows a read holds over from an earlier BPTT window, the penalty's tokens under
        # importance_detach
        z_cut = self.importance(pool.detach()).squeeze(-1) if own is not None or detach else None
        aux = self.penalty(entries, (z_cut if detach else z)[:, M:].view(B, W, S))  # [W] or None
        after = gather_rows(pool, last)  # [B, M, C]
        importance = z.gather(1, held)  # [B, W M]
        if own is not None:
            after = torch.where(own[:, W, :, None], after, after.detach())  # held over: detached
            importance = torch.where(own[:, :W].flatten(1), importance, z_cut.gather(1, held))  # held over: detached
        return importance, after, aux

    def states_before(self, scan: Scan) -> torch.Tensor:
        """The memories before each scanned segment [B W, M, C] (values, without gradient): the rows each holds, from
        [the tokens held before the scan and at later windows' starts (`Scan.row_tokens`); the scanned tokens]."""
        tokens = torch.cat([scan.row_tokens, scan.entries.flatten(1, 2).to(scan.row_tokens.dtype)], dim=1).detach()
        B, W, M = scan.rows.shape
        return gather_rows(tokens, scan.rows.flatten(1)).view(B * W, M, -1)

    def window_rows(self, kept: torch.Tensor, segment: int, windows: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A scan's bookkeeping over BPTT windows of `windows` segments: kept [B, W + 1, M] the pool rows held before
        each segment and after the last (ascending) -> (own [B, W + 1, M]: the rows each memory reads with their
        gradient, rows [B, W, M]: where each held row sits in [the M rows held before the scan; the U pool rows of
        later; the scanned tokens], later [B, U]: the pool rows held at each later window's start, (G - 1) M of
        them). Where the loops run compiled (`compiled_loops`) the compiled loop runs instead (`choice.window_rows`;
        the compiled scan calls it inside its own pass), which lists each token in later once (fewer rows to
        project; the same tokens for every held row); these ops are its reference."""
        if self.compiled_loops(kept):
            from ltm_core.memory import choice

            return choice.window_rows(kept, self.slots, segment, windows)
        M, S, G, W = self.slots, segment, len(windows), kept.shape[1] - 1
        starts, window = window_index(windows, kept.device)  # [G] first segments, [W + 1] windows
        first = (M + starts * S)[window][None, :, None]  # [1, W + 1, 1] each window's first token row
        own = (kept >= first) | (window == 0)[None, :, None]  # rows this window reads with their gradient
        at_start = kept[:, starts][:, window[:W]]  # [B, W, M] the rows held at each segment's window start (sorted)
        before = kept[:, :W]
        slot = torch.searchsorted(at_start.contiguous(), before.contiguous())  # where a held-over row sits there
        mine = before >= first[:, :W]  # the segment's own window's tokens
        # window 0's rows are the state's, in order; a later window's, its block of M in later
        rows = torch.where(mine, before - M + G * M, window[:W][None, :, None] * M + slot)
        return own, rows, kept[:, starts[1:]].flatten(1)

    # ------------------------------------------------------------------------------------------------- read
    def prefix(self, state: torch.Tensor, importance: Optional[torch.Tensor] = None,
               empty: Optional[torch.Tensor] = None) -> Prefix:
        """state: [B, M, C] -> the kept tokens, their straight-through weight s = sigmoid(importance) (the tokens'
        keys and values are unchanged, and the importance learns from the reads through it) and their score bias:
        empty slots masked, plus log sigmoid(importance) with read_importance. `importance` [B, M] and `empty`
        [B, M] (bool): the slots' importance (with its gradients) and which are empty, when a scan already has them
        (else computed here)."""
        z = (self.importance(state).squeeze(-1) if importance is None else importance).float()  # [B, M]
        s = torch.sigmoid(z)
        bias = (self.empty(state) if empty is None else empty).float() * EMPTY_SLOT_SCORE  # state: None if both given
        if self.config.read_importance:
            bias = bias + self.shared_by_heads(F.logsigmoid(z))
        return Prefix(state, bias, self.shared_by_heads(s))

    def scan_prefix(self, scan: Scan) -> Prefix:
        """The prefix of each scanned segment, from the importance its scan computed once per pool row and the
        empty slots its loop flagged."""
        if scan.prefix is not None:  # made by the compiled scan
            return scan.prefix
        return self.prefix(scan.before, scan.importance, scan.empty)

    def flops_per_token(self, segment_length: int) -> float:
        """The read over M more keys (12 C M), and the q|k|v projection of the M tokens held at each window's start
        (6 * 3 C^2 * M / (T * bptt_segments); the window's own kept tokens reuse the keys and values the attention
        computed for them). The model's count: the compiled scan projects a token held at several windows' starts
        once."""
        C, M, T = self.model_config.hidden_size, self.slots, segment_length
        return 12 * C * M + 6 * 3 * C * C * M / (T * self.model_config.bptt_segments)


class _CompiledScan(torch.autograd.Function):
    """`TokensMemory.scan_windows` on CPU in float32, its choices included, as one compiled pass each way
    (`ltm_core.cpu_kernels.scan_forward` / `_backward`; the reference: `choose`, `window_rows`, `_held_scores`,
    `prefix` and the rows' gathers in `scan_windows`): over the pool [state [B, M, C]; entries [B, W S, C]] (the
    rows held before the scan, then W segments of S tokens), the importance's weight [1, C] and bias [1], noise the
    writes' (samples, tau) (`choice.gumbel_source`), layout the BPTT windows' (`choice.window_layout`), S, penalty
    (lambda, 0: none), detach (the penalty's gradient to w and b only), read_importance -> (each segment's read prefix:
    score bias and straight-through weight [B W, M]; the state after [B, M, C]; the penalty per segment [W]; the rows
    the reads hold over from a window's start [B, M + U, C]: the state, then the U tokens held at a later window's
    start, each once, detached; and, without gradients, each write's kept candidates [B, W, M] and where each
    segment's held rows sit among [those rows; the scanned tokens] [B, W, M]). A row held over from an earlier BPTT
    window passes its gradient to w and b only."""

    @staticmethod
    def forward(ctx, state, entries, weight, bias, noise, layout, segment, penalty, detach, read_importance):
        from ltm_core import cpu_kernels

        held, keeps, own, rows, sig, prefix_bias, through, after, aux, row_tokens = cpu_kernels.scan_forward(
            state, entries, weight[0], bias, noise, VACANT_RANK, layout, segment, penalty, read_importance,
            EMPTY_SLOT_SCORE)
        ctx.save_for_backward(state, entries, weight, sig, held, own)
        ctx.options = (segment, penalty, detach, read_importance)
        ctx.set_materialize_grads(False)  # no zeros made for the outputs without a gradient (the state after a pass,
        # the rows, the choices)
        ctx.mark_non_differentiable(keeps, rows)
        if not ctx.needs_input_grad[0]:  # the rows take a gradient only for the state (later windows' rows are
            ctx.mark_non_differentiable(row_tokens)  # detached): without one, their projection skips its input's
        return prefix_bias, through, after, aux, row_tokens, keeps, rows

    @staticmethod
    def backward(ctx, dprefix_bias, dthrough, dafter, daux, drow_tokens, _dkeeps, _drows):
        from ltm_core import cpu_kernels

        state, entries, weight, sig, held, own = ctx.saved_tensors
        B, W, M = state.shape[0], held.shape[1] - 1, state.shape[1]
        dprefix_bias, dthrough = (sig.new_zeros(B * W, M) if t is None else t for t in (dprefix_bias, dthrough))
        daux = sig.new_zeros(W) if daux is None else daux
        dstate, dentries, dweight, dbias = cpu_kernels.scan_backward(
            state, entries, weight[0], sig, held, own, dprefix_bias, dthrough, dafter, daux, drow_tokens, *ctx.options)
        return dstate, dentries, dweight.view_as(weight), dbias, None, None, None, None, None, None
