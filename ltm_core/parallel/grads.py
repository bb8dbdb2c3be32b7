"""Gradients across the mesh: tied embeddings between pipeline stages, the global norm and clipping, and a
dynamic loss scale for fp16.

A gradient is either a plain tensor (replicated on its tp/dp peers: identical there, counted once) or a DTensor
whose local shards add up over the mesh dimensions it is sharded on (TP and FSDP). The squared norm is summed
per set of sharded dimensions, all-reduced over exactly those dimensions, then summed over pipeline stages.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ltm_core.parallel.build import ParallelModel


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def sync_tied_embeddings(pm: ParallelModel) -> None:
    """Sum the gradients of the tied embedding / LM head held by the first and the last pipeline stage."""
    if pm.tie_group is None:
        return
    for name, p, _ in pm.named_parameters():
        if name in ("embed_tokens.weight", "lm_head.weight") and p.grad is not None:
            dist.all_reduce(_local(p.grad), group=pm.tie_group)


def grad_norm(pm: ParallelModel) -> torch.Tensor:
    """The global L2 norm of all gradients (fp32 scalar, identical on every rank)."""
    sums: dict[tuple, torch.Tensor] = {}
    groups: dict[tuple, list] = {}
    for _, p, counted in pm.named_parameters():
        if p.grad is None or not counted:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            dims = tuple(i for i, pl in enumerate(g.placements)
                         if pl.is_shard() or type(pl).__name__ == "_StridedShard")
            names = mesh.mesh_dim_names or tuple(f"dim{i}/{mesh.ndim}" for i in range(mesh.ndim))
            key = tuple(names[i] for i in dims)  # the same on every rank: all-reduces are issued in one order
            groups[key] = [mesh.get_group(i) for i in dims]
            g = g.to_local()
        else:
            key = ()
            groups[key] = []
        sq = g.detach().float().pow(2).sum()
        sums[key] = sums[key] + sq if key in sums else sq
    total = torch.zeros((), device=pm.device, dtype=torch.float32)
    for key in sorted(sums, key=str):
        s = sums[key]
        for group in groups[key]:
            dist.all_reduce(s, group=group)
        total = total + s
    if pm.layout.pp > 1:
        dist.all_reduce(total, group=pm.group("pp"))
    return total.sqrt()


def scale_grads_(pm: ParallelModel, factor: torch.Tensor | float) -> None:
    for _, p, _ in pm.named_parameters():
        if p.grad is not None:
            _local(p.grad).mul_(factor)


def clip_grads_(pm: ParallelModel, max_norm: float, norm: torch.Tensor) -> None:
    """Lightning / torch.nn.utils.clip_grad_norm_ semantics: scale by min(1, max_norm / (norm + 1e-6))."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for _, p, _ in pm.named_parameters():
        if p.grad is not None:
            g = _local(p.grad)
            g.mul_(coef.to(g.dtype))


class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's policy; works with DTensor gradients because the
    overflow check uses the global gradient norm)."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self._good = 0

    def unscale(self, pm: ParallelModel, norm: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Returns (step?, unscaled norm); on overflow halves the scale and the step must be skipped."""
        if not self.enabled:
            return True, norm
        if not math.isfinite(float(norm)):
            self.scale /= 2
            self._good = 0
            return False, norm
        scale_grads_(pm, 1.0 / self.scale)
        self._good += 1
        norm = norm / self.scale
        if self._good % self.growth_interval == 0:
            self.scale *= 2
        return True, norm

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self._good}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._good = float(state.get("scale", self.scale)), int(state.get("good", 0))
