"""TitanModel: a segment-recurrent transformer with a long-term memory bank.

The input is read in segments of `segment_length` tokens. Inside a segment, attention is causal; across
segments, information flows only through each layer's memory bank (see `ltm_core.memory`). Block:

    x += conv(x)                          short_conv=K: causal depthwise inside the segment (K - 1 predecessors;
                                          across segments with the memory state: short_conv_carry)
    x += SelfAttention(norm(x))           causal inside the segment (+ memory slots as prefix: memory_read=context,
                                          or the kept tokens through its own key/value projections: tokens)
    x += MemoryAttention(norm(x), mem)    memory_read=cross
    x += FeedForward(norm(x))             SwiGLU
    memory write of the segment from x     (write_from=attention: from x before the memory read; tokens: norm(x))

`use_memory=False` is the same code without the memory: a segment-local transformer, and a full-causal one when
`segment_length >= sequence length`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ltm_core import ops
from ltm_core.attention import attention
from ltm_core.config import TitanConfig
from ltm_core.memory import DeltaRead, LayerState, LongTermMemory, MemoryRead, MemoryState, RMSNorm, causal_conv


EMPTY_SLOT_SCORE = -1e3  # memory_read=tokens: added to an empty slot's scores (exp(-1000) = 0 in any precision)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] -> cos, sin: [T, head_dim // 2] (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(1) * inv_freq  # [T, hd/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (x[..., :hd/2], x[..., hd/2:])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerState,
                prefix: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], backend: str):
        """h: [B, T, C] -> (out [B, T, C], keys and values of the segment so far [B, H, t + T, hd])."""
        B, T, C = h.shape
        q, k, v = self.qkv_proj(h).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,T,hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past.keys is not None:  # tokens already seen in this segment
            k, v = torch.cat([past.keys, k], dim=2), torch.cat([past.values, v], dim=2)
        keys, values, prefix_len, bias = k, v, 0, None
        if prefix is not None:  # memory as context: slots are a non-causal prefix (with read_importance's bias)
            keys, values = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
            prefix_len, bias = prefix[0].shape[2], prefix[2]
        y = attention(q, keys, values, causal=True, prefix_len=prefix_len, backend=backend,
                      key_bias=bias)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), k, v  # -1: local heads under TP

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, M, C] normed tokens kept by the memory (memory_read=tokens) -> their keys and values through this
        attention's own projections [B, H, M, hd], not rotated: the slots carry no position."""
        B, M, _ = h.shape
        _, k, v = self.qkv_proj(h).view(B, M, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v


class FeedForward(nn.Module):
    """SwiGLU: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.backend = cfg.kernels
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(ops.swiglu(gate, up, self.backend))


class Block(nn.Module):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.attn = SelfAttention(cfg)
        if cfg.short_conv:  # [C, K] one weight per channel and tap
            self.short_conv = nn.Parameter(torch.empty(cfg.hidden_size, cfg.short_conv))
        if cfg.use_memory:
            self.memory = LongTermMemory(cfg)
            if cfg.memory_read != "tokens":  # tokens: the self-attention reads the memory itself
                self.memory_read = DeltaRead(cfg) if cfg.memory_write == "delta" else MemoryRead(cfg)
            if cfg.memory_read == "cross":
                self.memory_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.ffn = FeedForward(cfg)

    def reset_parameters(self) -> None:
        std, residual_std = self.cfg.init_std, self.cfg.init_std / (2 * self.cfg.num_hidden_layers) ** 0.5
        for norm in (self.attn_norm, self.ffn_norm, getattr(self, "memory_norm", None)):
            if norm is not None:
                norm.reset_parameters()
        nn.init.normal_(self.attn.qkv_proj.weight, std=std)
        nn.init.normal_(self.attn.o_proj.weight, std=residual_std)
        if self.cfg.short_conv:  # the block starts as it would be without it
            nn.init.zeros_(self.short_conv)
        nn.init.normal_(self.ffn.gate_up_proj.weight, std=std)
        nn.init.normal_(self.ffn.down_proj.weight, std=residual_std)
        if self.cfg.use_memory:
            self.memory.reset_parameters()
            if hasattr(self, "memory_read"):
                self.memory_read.reset_parameters()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerState):
        """x: [B, T, C] -> (x, keys, values [B, H, t + T, hd], gated content [B, T, D] or None, the block inputs
        of the last K - 1 tokens [B, K - 1, C] for short_conv=K or None)."""
        backend = self.cfg.kernels
        shift = None
        if self.cfg.short_conv:
            x, shift = self._short_conv(x, past.shift)
        mem = past.memory
        bias = None  # read_importance: log sigmoid(importance) of each slot, added to its read scores [B, M]
        if mem is not None and self.cfg.read_importance:
            bias = self.shared_by_heads(F.logsigmoid(self.memory.importance(mem).squeeze(-1).float()))
        important = None  # slot_order=important: the entries the write ranks important [B, M]
        if mem is not None and self.cfg.slot_order == "important":
            important = self.memory.important(mem)
        prefix = None
        if mem is not None and self.cfg.memory_read == "context":
            prefix = (*self.memory_read.kv(mem, important), bias)  # slot keys, values [B, H, M, hd]; bias [B, M]
        if mem is not None and self.cfg.memory_read == "tokens":  # empty slots are masked out of the read
            masked = self.memory.empty(mem).float() * EMPTY_SLOT_SCORE  # [B, M]
            prefix = (*self.attn.kv(mem), masked if bias is None else bias + masked)
        normed = self.attn_norm(x)  # [B, T, C]: what memory_read=tokens writes
        a, k, v = self.attn(normed, cos, sin, past, prefix, backend)
        x = x + a
        attended = x  # [B, T, C]: what write_from=attention compresses (before the memory read)
        if mem is not None and self.cfg.memory_read == "cross":
            x = x + self.memory_read(self.memory_norm(x), mem, backend, bias, important)
        x = x + self.ffn(self.ffn_norm(x))
        written = normed if self.cfg.memory_read == "tokens" else attended if self.cfg.write_from == "attention" else x
        gated = None if mem is None else self.memory.gate(written)
        return x, k, v, gated, shift

    @staticmethod
    def shared_by_heads(t: torch.Tensor) -> torch.Tensor:
        """A replicated tensor that every head's read uses. Under tensor parallelism a rank holds only its heads,
        so the gradient is summed over the tp group there (`apply_tensor_parallel` replaces this identity)."""
        return t

    def _short_conv(self, x: torch.Tensor, before: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C], before: [B, K - 1, C] the inputs of the segment's tokens before it (None: zeros, x starts a segment)
        -> (x + the causal depthwise convolution of x [B, T, C], the inputs of the last K - 1 tokens [B, K - 1, C])."""
        B, T, C = x.shape
        if before is None:
            before = x.new_zeros(B, self.short_conv.shape[1] - 1, C)
        y = causal_conv(x, self.short_conv.unsqueeze(1), before)  # [B, T, C]
        return x + y, torch.cat([before.to(x.dtype), x], dim=1)[:, T:]  # T may be shorter than K - 1


@dataclass
class TitanOutput:
    logits: torch.Tensor  # [B, L, vocab]
    memory: MemoryState  # state after the last token, to continue from
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over labels != -100, when labels are given


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


class TitanModel(nn.Module):
    def __init__(self, cfg: TitanConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._compiled_layers = compile_layers(self)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ----------------------------------------------------------------------------------------- construction
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after `to_empty()` when the model was built on the meta device."""
        self.tie_weights()
        nn.init.normal_(self.embed_tokens.weight, std=self.config.init_std)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings and not self.config.tie_word_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the nanoGPT/torchtitan way:
        6N (dense parameters, embedding lookup excluded) + 12 L d T (attention over T = min(segment, seq_len)
        keys) + 12 L d M (memory read over M slots) + 12 L M D (memory write attention, per token) + the slots'
        key/value projection, which runs on M slots once per segment, M / T times per token, not once as 6N counts
        it (memory_read=tokens: the self-attention's q|k|v projection, also run on the M kept tokens)."""
        cfg = self.config
        n = self.num_parameters() - (self.embed_tokens.weight.numel() if not cfg.tie_word_embeddings else 0)
        T = min(cfg.segment_length, seq_len)
        L, C, M = cfg.num_hidden_layers, cfg.hidden_size, cfg.memory_slots
        flops = 6 * n + 12 * L * C * T
        if cfg.use_memory:
            flops += 12 * L * C * M + 12 * L * M * cfg.memory_dim
            read = getattr(self.blocks[0], "memory_read", None)
            if isinstance(read, MemoryRead):  # kv_proj: counted once per token in 6N, run M / T times
                flops += 6 * L * read.kv_proj.weight.numel() * (M / T - 1)
            elif cfg.memory_read == "tokens":  # qkv_proj: once per token (in 6N) and on the M kept tokens
                flops += 6 * L * 3 * C * C * M / T
        return float(flops)

    # ---------------------------------------------------------------------------------------------- forward
    def initial_state(self, batch_size: int) -> MemoryState:
        layers = [LayerState(block.memory.initial_state(batch_size) if self.config.use_memory else None)
                  for block in self.blocks]
        return MemoryState(layers, batch_size=batch_size)

    def forward(self, input_ids: torch.Tensor, memory: Optional[MemoryState] = None,
                labels: Optional[torch.Tensor] = None) -> TitanOutput:
        """input_ids: [B, L] -> logits [B, L, vocab]; continues from `memory` (the previous call's state)."""
        B, L = input_ids.shape
        state = memory if memory is not None else self.initial_state(B)
        x = self.embed_tokens(input_ids)  # [B, L, C]
        chunks, pos = [], 0
        while pos < L:
            t = min(self.config.segment_length - state.offset, L - pos)
            h, state = self._step(x[:, pos:pos + t], state)
            chunks.append(h)
            pos += t
        h = self.norm(torch.cat(chunks, dim=1)) if chunks else x
        logits = self.lm_head(h)  # [B, L, vocab]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return TitanOutput(logits=logits, memory=state, loss=loss)

    def _step(self, x: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """Read t tokens that all fall in the current segment. x: [B, t, C]."""
        cfg = self.config
        complete = state.offset + x.shape[1] == cfg.segment_length
        # a whole segment (training, prefill) has the same shapes every time: the compiled unit (model.compile)
        whole = complete and state.offset == 0 and self._compiled_layers is not None
        layers_fn = self._compiled_layers if whole else self._layers
        x, layers = layers_fn(x, state.offset, tuple(state.layers), complete, state.segments == 0)
        if whole and cfg.compile_mode in CUDA_GRAPH_MODES:
            # a CUDA-graph replay overwrites the outputs of the previous one, and a new iteration (a call with no
            # backward pending: inference, the next BPTT window) frees them: the state and the segment's output
            # outlive the call, so they are copied out of the graph's memory pool
            x, layers = x.clone(), tuple(ls.map(torch.clone) for ls in layers)
        segments = state.segments + complete
        new = MemoryState(list(layers), 0 if complete else state.offset + x.shape[1], segments, state.batch_size)
        if complete and segments % cfg.bptt_segments == 0:
            new = new.detach()  # truncated BPTT: gradients stop at window boundaries
        return x, new

    def _layers(self, x: torch.Tensor, offset: int, pasts: tuple[LayerState, ...], complete: bool,
                first: bool) -> tuple[torch.Tensor, tuple[LayerState, ...]]:
        """x: [B, t, C] at segment positions offset..offset + t through every block; when the segment is
        `complete`, each layer's memory is written. `first`: no segment has been written yet."""
        cfg = self.config
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # positions inside the segment
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)
        layers = []
        for block, past in zip(self.blocks, pasts):
            if cfg.activation_checkpointing and self.training:
                x, k, v, gated, shift = checkpoint(block, x, cos, sin, past, use_reentrant=False)
            else:
                x, k, v, gated, shift = block(x, cos, sin, past)
            if gated is not None and past.gated is not None:
                gated = torch.cat([past.gated, gated], dim=1)  # [B, offset + t, D]
            if not complete:
                layers.append(LayerState(past.memory, k, v, gated, past.tail, shift))
            elif past.memory is not None:
                # the segment is written; on the first write the memory is still the learned initial one
                memory = block.memory.write(past.memory, gated, first=first, tail=past.tail)
                carried = shift if cfg.short_conv_carry else None  # else the next convolution starts from zeros
                layers.append(LayerState(memory, tail=block.memory.tail(gated, past.tail), shift=carried))
            else:  # a complete segment: the next one's convolution starts from zeros, as its attention from nothing
                layers.append(LayerState(None))
        return x, tuple(layers)


def compile_layers(module: nn.Module) -> Optional[Callable]:
    """`model.compile`: the whole-segment step (every block and memory write) through torch.compile, in
    `model.compile_mode`; None when compilation is off."""
    cfg = module.config
    return torch.compile(module._layers, mode=cfg.compile_mode) if cfg.compile else None
