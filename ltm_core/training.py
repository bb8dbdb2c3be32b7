"""The training step without Lightning: the windowed backward, the optimizer and its schedule (used by the
Lightning module `ltm_core.lit.TitanLightning`, the native-parallel loop and `ltm bench`).

Backpropagation runs window by window: `bptt_segments` segments form a window, gradients flow through the
memory writes inside a window, the memory is detached between windows, and backward is called once per
`windows_per_pass` windows with gradients accumulating. Peak activation memory is therefore set by the windows of
one pass, not the sequence length.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ltm_core.config import OptimConfig, TitanConfig
from ltm_core.errors import RunStopped
from ltm_core.model import TitanModel

LN2 = math.log(2)


def window_span(cfg: TitanConfig, seq_len: int) -> int:
    """Tokens per backward. With a memory: `windows_per_pass` BPTT windows (of `segment_length * bptt_segments`
    tokens), or the sequence's windows if fewer; the last pass holds the rest (at 8K, `tiny`'s 32 windows run in
    passes of 6, 6, 6, 6, 6 and 2). Without one (the segment-local and full-causal baselines) nothing is carried,
    and the whole sequence is one batched call."""
    if not cfg.use_memory:
        return max(seq_len, 1)
    window = cfg.segment_length * cfg.bptt_segments
    windows = max(1, -(-seq_len // window))
    return window * min(cfg.windows_per_pass, windows)


def windowed_backward(model: TitanModel, input_ids: torch.Tensor, labels: torch.Tensor,
                      backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                      loss_scale: float = 1.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward and backward over `input_ids` [B, L], one truncated-BPTT window at a time.

    The gradients equal those of the mean token loss over the whole sequence (with the memory detached between
    windows), plus the memory writes' auxiliary losses (applied through the writes themselves). Returns that mean
    loss and the summed auxiliary loss (None without one), both detached.
    """
    span = window_span(model.config, input_ids.shape[1])
    n_tokens = (labels != -100).sum().clamp(min=1)
    scale = loss_scale / n_tokens  # once, not per pass
    state, total, aux = None, torch.zeros((), device=input_ids.device), None
    for start in range(0, input_ids.shape[1], span):
        out = model(input_ids[:, start:start + span], memory=state)
        loss_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), labels[:, start:start + span].flatten(),
                                   ignore_index=-100, reduction="sum")
        backward(loss_sum * scale)
        state = out.memory.detach()
        total += loss_sum.detach()
        if out.aux_loss is not None:
            aux = out.aux_loss.detach() + (0 if aux is None else aux)
    return total / n_tokens, aux


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, embeddings' ties are matrices too). Its update is
    fused into one kernel per parameter (PyTorch's default on CPU runs a dozen ops per parameter: `model=small`'s
    optimizer step took 0.22x the time on the 2-core CPU, `scripts/bench_optimizer.py`), except where a parameter is
    a DTensor (sharded by FSDP or tensor parallelism), which keeps PyTorch's default: its fused kernel refused tp2's
    DTensors beside plain tensors.

    The fused AdamW declares that its step unscales fp16 gradients itself (`_step_supports_amp_scaling`: GradScaler
    hands it the scale), and Lightning's mixed-precision plugin (bf16-mixed and 16-mixed alike, on CPU and GPU)
    refuses to clip the gradients of such an optimizer. The gradients have to be unscaled before clipping anyway, so
    the flag is cleared: GradScaler unscales them before the step (`unscale_`, as for any optimizer), and the fused
    kernel takes them unscaled. Nothing else reads the flag: without a GradScaler (fp32, bf16) the step is unchanged."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(type(p.data) is torch.Tensor for p in decay + no_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    optimizer._step_supports_amp_scaling = False
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rebase_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> Optional[float]:
    """After a resume: the schedule goes on at the step it reached, from the configured base rate `lr` (a
    scheduler's state restores the base rate it was trained with, so `optim.lr=LOWER resume=auto` after a
    divergence would otherwise keep the rate that diverged). Returns the base rate it replaced, None if unchanged."""
    before = scheduler.base_lrs[0]
    if all(b == lr for b in scheduler.base_lrs):
        return None
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return before


class Diverged(RunStopped):
    """`trainer.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient (each was skipped)."""

    def __init__(self, step: int, count: int):
        self.step, self.count = step, count
        super().__init__(f"training diverged at step {step}: {count} attempts in a row had a non-finite loss or "
                         "gradient (none was applied)")


