"""Generation with a bounded state: a KV cache inside the current segment plus the memory across segments.

Cost per token and memory do not grow with the length generated: once a segment is complete its keys/values
are dropped and only the memory bank ([B, M, D] per layer) is carried on.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ltm_core.errors import ConfigError
from ltm_core.model import InputIdsError, TitanModel, check_input_ids
from ltm_core.tokenizer import EOS

SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes (a negative seed is mapped to 2**64 + s)
PREFILL_TOKENS = 4096  # the prompt is read in calls of about this many tokens (`prefill_tokens`)


class InferenceConfigError(ConfigError, ValueError):
    """A bad InferenceConfig field: one line naming it (a ConfigError; also the ValueError it was before)."""


def prefill_tokens(config) -> int:
    """Tokens per call when `InferenceEngine` reads a prompt: a whole number of the model's layer-major passes
    (`windows_per_pass` BPTT windows of `bptt_segments` segments), about PREFILL_TOKENS, at least one pass. The
    model reads a longer input in passes of that size anyway, so the calls give exactly the one-call logits and
    state, while the prompt's embeddings, hidden states and logits are held for one call's tokens only: peak memory
    does not grow with the prompt."""
    unit = config.segment_length * config.bptt_segments * config.windows_per_pass
    return unit * max(1, PREFILL_TOKENS // unit)


@dataclass
class InferenceConfig:
    temperature: float = 0.8  # 0 -> greedy
    top_k: Optional[int] = None  # keep the k most likely tokens
    top_p: Optional[float] = None  # keep the smallest set of tokens whose probability reaches p
    seed: Optional[int] = None  # sampling seed
    stop_at_eos: bool = True
    use_memory_cache: bool = True  # carry the state from token to token (the memory and the current segment's
    # keys/values): constant cost per token. False: re-read the whole sequence for every new token, with no state
    # carried (the reference the cache must equal; its cost grows with the length)
    max_sequence_length: Optional[int] = None  # the longest sequence, prompt + generated tokens: generation stops
    # there and a longer prompt is an error; None: no limit (the state is bounded however long the output)

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InferenceConfigError("temperature", f"must be a finite number >= 0 (0: greedy), got "
                                                      f"{self.temperature!r}")
        if self.top_k is not None and self.top_k <= 0:
            raise InferenceConfigError("top_k", f"must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InferenceConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not _is_integer(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InferenceConfigError("seed", f"must be an integer from -2**63 to 2**64 - 1 (torch's seed range), "
                                               f"got {self.seed!r}")
        if self.max_sequence_length is not None and self.max_sequence_length <= 0:
            raise InferenceConfigError("max_sequence_length", f"must be positive, got {self.max_sequence_length}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def filter_logits(logits: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """logits: [B, V] -> the fp32 logits sampling draws from [B, V]: divided by the temperature (> 0), tokens outside
    top-k / the top-p nucleus at -inf. The Hugging Face export samples through this same function."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= cfg.top_p  # tokens after the nucleus is full
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, cfg: InferenceConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B]: the argmax at temperature 0, else a draw from `filter_logits`."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class InferenceEngine:
    def __init__(self, model: TitanModel, config: Optional[InferenceConfig] = None):
        self.model = model.eval()
        self.config = config or InferenceConfig()

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.config.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.config.seed)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
        """Yield next tokens [B] one at a time. input_ids: [B, T] (T >= 1) integer ids of the model's vocabulary;
        a bad prompt is a one-line `InputIdsError` (a DataError) here, before the first token is asked for;
        max_new_tokens must be an integer >= 0 (0: nothing is generated)."""
        try:
            count = None if isinstance(max_new_tokens, bool) else operator.index(max_new_tokens)
        except TypeError:
            count = None
        if count is None or count < 0:
            raise InferenceConfigError("max_new_tokens", f"must be an integer >= 0 (0: the prompt only), got "
                                                         f"{max_new_tokens!r}")
        max_new_tokens = count
        config = getattr(self.model, "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        check_input_ids(input_ids, vocab_size or 0, ids_range=vocab_size is not None)
        if input_ids.shape[1] == 0:
            raise InputIdsError("data error: input_ids must hold at least one token per row, got shape "
                                f"{tuple(input_ids.shape)}")
        limit = self.config.max_sequence_length
        if limit is not None:
            if input_ids.shape[1] > limit:
                raise InputIdsError(f"data error: the prompt has {input_ids.shape[1]} tokens, more than "
                                    f"max_sequence_length={limit}")
            max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
        return self._stream(input_ids, max_new_tokens)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor):
        """The prompt [B, T] -> the model's output after it (the last call's logits, the state after the prompt:
        the memory and the current segment's KV cache). With `use_memory_cache`, read in calls of
        `prefill_tokens` tokens that carry the state (the same logits and state as one call, at a peak memory that
        does not grow with the prompt); without, one call (no state is carried in that mode)."""
        config = getattr(self.model, "config", None)
        T = input_ids.shape[1]
        step = prefill_tokens(config) if config is not None and self.config.use_memory_cache else T
        out = self.model(input_ids[:, :step])
        for start in range(step, T, step):
            state = out.memory
            out = None  # the previous call's logits go before the next call
            out = self.model(input_ids[:, start:start + step], memory=state)
        return out

    @torch.inference_mode()
    def _stream(self, input_ids: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
        if max_new_tokens <= 0:
            return
        generator = self._generator(input_ids.device)
        out = self.prefill(input_ids)  # the prompt: fills the memory and the current segment's KV cache
        ids = input_ids  # [B, t] the sequence so far (use_memory_cache=False re-reads it)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample(out.logits[:, -1], self.config, generator)  # [B]
            yield token
            if self.config.stop_at_eos:
                finished |= token == EOS
                if bool(finished.all()):
                    return
            if step == max_new_tokens - 1:
                return
            if self.config.use_memory_cache:
                out = self.model(token.unsqueeze(1), memory=out.memory)
            else:
                ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
                out = self.model(ids)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 callback: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """input_ids [B, T] -> [B, T + n] with n <= max_new_tokens generated tokens."""
        tokens = [input_ids]
        for token in self.stream(input_ids, max_new_tokens):
            tokens.append(token.unsqueeze(1))
            if callback is not None:
                callback(token)
        return torch.cat(tokens, dim=1)
