"""Training: the windowed backward, the LightningModule, and `train(cfg)` (what `ltm train` runs).

Backpropagation runs window by window: `bptt_segments` segments form a window, gradients flow through the
memory writes inside a window, the memory is detached between windows, and backward is called once per window
with gradients accumulating. Peak activation memory is therefore set by the window, not the sequence length.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F

from ltm_core.config import OptimConfig, TitanConfig
from ltm_core.errors import CheckpointError, RunStopped
from ltm_core.model import TitanModel
from ltm_core.run_guard import TrainingStream, check_rng_state

LN2 = math.log(2)


def window_span(cfg: TitanConfig, seq_len: int) -> int:
    """Tokens per backward: one BPTT window (`segment_length * bptt_segments`) with a memory; without one (the
    segment-local and full-causal baselines) nothing is carried, and the whole sequence is one batched call."""
    return cfg.segment_length * cfg.bptt_segments if cfg.use_memory else max(seq_len, 1)


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
    state, total, aux = None, torch.zeros((), device=input_ids.device), None
    for start in range(0, input_ids.shape[1], span):
        out = model(input_ids[:, start:start + span], memory=state)
        loss_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), labels[:, start:start + span].flatten(),
                                   ignore_index=-100, reduction="sum")
        backward(loss_sum * (loss_scale / n_tokens))
        state = out.memory.detach()
        total += loss_sum.detach()
        if out.aux_loss is not None:
            aux = out.aux_loss.detach() + (0 if aux is None else aux)
    return total / n_tokens, aux


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases, embeddings' ties are matrices too)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Diverged(RunStopped):
    """`trainer.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient (each was skipped)."""

    def __init__(self, step: int, count: int):
        self.step, self.count = step, count
        super().__init__(f"training diverged at step {step}: {count} attempts in a row had a non-finite loss or "
                         "gradient (none was applied)")


class TitanLightning(L.LightningModule):
    """Lightning wrapper: manual optimization so that each BPTT window gets its own backward.

    A step whose loss or gradient is not finite is skipped (no optimizer or schedule step, the batch is dropped; the
    count is logged as train/bad_steps); `trainer.max_bad_steps` of them in a row raise `Diverged`. The random numbers
    the steps draw come from a `TrainingStream` that checkpoints carry (exact resume with select noise)."""

    def __init__(self, config: dict[str, Any], model: Optional[TitanModel] = None):
        """`model`: train this model (its weights are the start, e.g. `Trainer(model=...)`); None: a new one."""
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.run_config = config
        self.model = model if model is not None else TitanModel(TitanConfig.from_dict(config["model"]))
        self.optim_cfg = OptimConfig(**config["optim"])
        self.max_steps = int(self.optim_cfg.schedule_steps or config["trainer"]["max_steps"])
        self.accumulate = int(config["trainer"]["accumulate_grad_batches"])
        self.model.aux_weight = 1.0 / self.accumulate  # the writes' auxiliary losses, scaled as the token loss
        self.automatic_optimization = False
        self.samples_seen = 0  # per rank; restored on resume so the data continues where it stopped
        self.max_bad_steps = int(config["trainer"].get("max_bad_steps", 3))
        self.bad_steps = 0  # skipped steps of the whole run (restored on resume)
        self.bad_in_a_row = 0
        self._bad_window = False  # a micro-batch of the current step had a non-finite loss
        # fp16-mixed: the GradScaler skips steps with inf gradients itself (and lowers its scale): only the loss counts
        self._check_grads = config["precision"]["lightning"] != "16-mixed"
        self.random_stream = TrainingStream()
        self._tick: Optional[float] = None

    def forward(self, input_ids: torch.Tensor, memory=None):
        return self.model(input_ids, memory=memory)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx: int):
        input_ids, labels = batch  # [B, L] each
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if self._tick is None:
            self._tick = time.perf_counter()
        with self.random_stream.active(self.device):
            loss, aux = windowed_backward(self.model, input_ids, labels, self.manual_backward, 1.0 / self.accumulate)
        self._bad_window |= not bool(torch.isfinite(loss))
        self.samples_seen += input_ids.shape[0]
        micro_step = self.samples_seen // input_ids.shape[0]
        if micro_step % self.accumulate == 0:
            bad = self._bad_window or (self._check_grads and not self._grads_finite())
            self._bad_window = False
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # every rank skips together
                optimizer.zero_grad(set_to_none=True)
                self.bad_steps += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= self.max_bad_steps:
                    raise Diverged(self.trainer.global_step + 1, self.bad_in_a_row)
            else:
                self.bad_in_a_row = 0
                if self.optim_cfg.grad_clip > 0:
                    self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.grad_clip,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        now = time.perf_counter()
        tokens_per_s = input_ids.numel() * self.trainer.world_size / max(now - self._tick, 1e-9)
        self._tick = now
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over data-parallel ranks
        self.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
        self.log("train/lr", scheduler.get_last_lr()[0])
        self.log("train/bad_steps", float(self.bad_steps))
        if aux is not None:  # the memory's auxiliary loss (e.g. the tokens memory's importance penalty)
            self.log("train/aux_loss", aux, sync_dist=True)
        return loss

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def validation_step(self, batch, batch_idx: int):
        input_ids, labels = batch
        out = self.model(input_ids, labels=labels)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log("val/bpb", out.loss / LN2, prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["samples_seen"] = self.samples_seen
        checkpoint["bad_steps"] = self.bad_steps
        if self.random_stream.state is not None:
            checkpoint["random_state"] = self.random_stream.state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
        self.bad_steps = int(checkpoint.get("bad_steps", 0))
        # a checkpoint from before random states were saved: the stream starts from the global state, as seeded
        self.random_stream.state = checkpoint.get("random_state")


def check_resumable(ckpt: dict[str, Any], module: TitanLightning, path: Path) -> None:
    """A checkpoint that `module` can resume from: the weights' names, shapes and dtypes, the AdamW state's shapes
    and the random state. One CheckpointError line otherwise (Lightning would raise deep inside its restore)."""
    from ltm_core.checkpoint import check_tensors

    check_tensors(ckpt["state_dict"], module.state_dict(), path)
    params = [p for g in build_optimizer(module.model, module.optim_cfg).param_groups for p in g["params"]]
    states = ckpt.get("optimizer_states")
    groups = states[0].get("param_groups") if isinstance(states, list) and states and isinstance(states[0], dict) else None
    if (not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups)
            or sum(len(g.get("params", ())) for g in groups) != len(params)):
        raise CheckpointError(f"checkpoint error: {path} holds no optimizer state for this model")
    for index, state in (states[0].get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(state, dict):
            raise CheckpointError(f"checkpoint error: {path}: optimizer state {index!r} belongs to no parameter")
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.shape != params[index].shape or not t.is_floating_point():
                raise CheckpointError(f"checkpoint error: {path}: optimizer state {key} of parameter {index} does "
                                      f"not fit the model (shape {list(params[index].shape)})")
    if "random_state" in ckpt:
        check_rng_state(ckpt["random_state"], str(path))
