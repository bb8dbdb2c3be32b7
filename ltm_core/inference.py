"""Generation with a bounded state: a KV cache inside the current segment plus the memory across segments.

Cost per token and memory do not grow with the length generated: once a segment is complete its keys/values
are dropped and only the memory bank ([B, M, D] per layer) is carried on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ltm_core.model import TitanModel
from ltm_core.tokenizer import EOS


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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_sequence_length is not None and self.max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {self.max_sequence_length}")


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

    @torch.inference_mode()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
        """Yield next tokens [B] one at a time. input_ids: [B, T] (T >= 1)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, tokens] with at least one token")
        limit = self.config.max_sequence_length
        if limit is not None:
            if input_ids.shape[1] > limit:
                raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, more than max_sequence_length={limit}")
            max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
        if max_new_tokens <= 0:
            return
        generator = self._generator(input_ids.device)
        out = self.model(input_ids)  # the prompt: fills the memory and the current segment's KV cache
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
