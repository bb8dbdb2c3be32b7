"""`bench_parallel(presets)`: communication volume of one training step per parallel preset, measured and analytic.

For each preset, the layout's processes are started (gloo on CPU, NCCL on GPUs), the preset's model is built
exactly as `ltm train` builds it, one warm-up step runs, then `steps` training steps run under
`ltm_core.parallel.comm.CommCounter` (the CommDebugMode mechanism, with sizes and point-to-point messages).
Beside the measurement, `analytic_volume` derives the same quantity from the model and layout:

    DDP        all-reduce of every gradient after each backward:                   dp · N · P · b
    FSDP2      one unit per model part: all-gather of the parameters once per backward (kept through it),
               one reduce-scatter of the gradients per step (per window with pipeline parallelism); a
               parameter that no dimension splits evenly over dp is padded (`_fsdp_numel`)
    TP         per layer and segment: all-reduce of the row-parallel outputs (attention, memory read,
               SwiGLU) in forward and of the column-parallel inputs' gradients in backward (B·T·C each),
               plus the memory write projections: all-gather of their outputs (B·M·D, B·T·D) and all-reduce of
               their input gradients when the write is inside a backprop window
    PP         per window and microbatch, each stage boundary sends the activations forward and their
               gradients back: 2 (stages - 1) · B · S · C · b per pipeline, plus the tied embedding's
               gradient all-reduce between the first and last stage

(W BPTT windows per batch; N backward calls per batch, as training makes them: one per pass of
`ltm_core.training.window_span` tokens, i.e. `model.windows_per_pass` windows with a memory and the whole
sequence without one, but one per window with pipeline parallelism, whose schedule steps window by window;
P parameters, b bytes per element, B batch per data-parallel rank, S sequence length, T segment length,
C hidden size, M memory slots, D memory width.) Volumes are payload bytes summed over all
ranks (see comm.py for the convention); scalar bookkeeping (loss, gradient norm) is reported apart.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

DEFAULT_PRESETS = ("ddp", "fsdp", "tp2", "pp2", "tp2_pp2")
SCALAR_BYTES = 64  # messages below this are counted as scalar bookkeeping (CommCounter's min_bytes), not volume
BENCH_OVERRIDES = (  # a small model that every preset (up to pp=4, tp=4) can split
    "model.hidden_size=64", "model.num_attention_heads=4", "model.num_hidden_layers=4", "model.memory.slots=16",
    "model.segment_length=32", "model.bptt_segments=2", "model.kernels=torch",
    "data.seq_len=128", "data.batch_size=4", "trainer.accelerator=cpu",
)


# ------------------------------------------------------------------------------------------- analytic model
def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fsdp_numel(shape: Sequence[int], dp: int) -> int:
    """Elements a parameter of `shape` adds to FSDP2's all-gather output (and reduce-scatter input) over dp ranks:
    the placement rule of `ltm_core.parallel.build.apply_fsdp` shards the first dimension that dp divides, else
    dimension 0, which FSDP2 pads to a multiple of dp (a [1] bias gathers 2 elements over 2 ranks)."""
    numel = math.prod(shape)
    if not shape or any(size % dp == 0 for size in shape):
        return numel
    return -(-shape[0] // dp) * dp * (numel // shape[0])


def analytic_volume(cfg, layout) -> dict[str, float]:
    """Payload bytes per training step summed over all ranks, by parallel dimension (see module docstring)."""
    from ltm_core.config import DataConfig
    from ltm_core.configuration import model_config, to_dict
    from ltm_core.model import TitanModel
    from ltm_core.parallel.build import PRECISIONS
    from ltm_core.parallel.layout import uses_native
    from ltm_core.parallel.pipeline import split_layers
    from ltm_core.training import window_span

    mc = model_config(cfg)
    data = DataConfig(**to_dict(cfg.data))
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    with torch.device("meta"):
        model = TitanModel(mc)
    model.tie_weights()
    B, S, C, T = data.batch_size, data.seq_len, mc.hidden_size, mc.segment_length
    M, D, L = mc.memory.slots, mc.memory.width(mc), mc.num_hidden_layers
    span = T * mc.bptt_segments
    W = math.ceil(S / span)  # BPTT windows: the memory is detached between them
    # backward calls per step: one per pass (`windowed_backward`), one per window through a pipeline schedule
    N = W if pp > 1 else math.ceil(S / window_span(mc, S))
    precision = str(cfg.precision.lightning)
    pbytes = PRECISIONS[precision].itemsize
    abytes = pbytes  # activations travel in the compute dtype
    gbytes = 2 if precision == "bf16-true" else 4  # gradients: fp32 unless the weights themselves are bf16
    out = {"dp": 0.0, "tp": 0.0, "pp": 0.0}
    P = _numel(model)
    if not uses_native(cfg):  # Lightning DDP: one all-reduce of all gradients per backward
        used_map = len(list(model.parameters())) * 4 if mc.use_memory else 0  # find_unused_parameters bitmap
        used_map = used_map if used_map >= SCALAR_BYTES else 0  # a smaller one is reported with the scalars
        out["dp"] = dp * N * (P * gbytes + used_map) if dp > 1 else 0.0
        return out

    kind = mc.memory_kind  # None (no memory), tokens, slots, delta or neural
    # ---- tensor parallel, per rank, for one layer, over the whole batch of its dp group
    if tp > 1:
        per_layer = 0.0
        segments = [(w, s) for w in range(W) for s in range(mc.bptt_segments) if (w * span + s * T) < S]
        rows = 3 if kind == "slots" else 2  # row-parallel outputs: attention, the slots' cross read, FFN
        for w, s in segments:
            tok = B * T * C * abytes
            per_layer += rows * tok  # forward: row-parallel outputs
            per_layer += rows * tok  # backward: column-parallel input gradients
            if kind == "tokens":  # the kept tokens' keys/values are gathered from the window's projections (the
                # memory held before the window is detached: no input gradient); every head reads the kept tokens'
                # straight-through factor (activation dtype) and read bias (fp32): their gradients sum over tp
                per_layer += B * M * abytes
                if mc.memory.read_importance:
                    per_layer += B * M * 4
            elif kind == "neural":  # its persistent and (mac) retrieved tokens through attn.qkv_proj: input gradient
                prefix = mc.memory.persistent + (mc.memory.retrieved if mc.memory.placement == "mac" else 0)
                per_layer += B * prefix * C * abytes
            elif kind == "slots":
                mem_grad = s > 0 or w == 0  # the memory of the window's first segment is detached (or learned)
                if mem_grad:
                    per_layer += B * M * D * abytes  # memory.reader.kv_proj input gradient
                per_layer += (2 * B * M * D + 2 * B * T * D) * abytes  # write attention: gathered outputs
                if s < mc.bptt_segments - 1:  # the write feeds the next segment of the same window
                    per_layer += (2 * B * T * D + 2 * B * M * D) * abytes  # key/value/update inputs
                    if mem_grad:
                        per_layer += B * M * D * abytes  # query input
        out["tp"] = per_layer * L * tp * dp
    # ---- data parallel (FSDP2, one unit per model part), per rank
    fsdp = dp > 1 or precision.endswith("mixed")
    if fsdp and dp > 1:
        total = 0.0
        for layers in split_layers(L, layout.num_stages):
            local = 0.0  # parameters of the stage held by one tp rank (FSDP-padded where not TP-sharded)
            for i in layers:
                blk = model.blocks[i]
                parts = [blk.attn, blk.ffn]
                if kind == "slots":  # the tokens and delta memories stay replicated under TP
                    parts += [getattr(blk.memory, n) for n in ("reader", "query", "key", "value", "update")]
                tp_sharded = {id(p) for m in parts for p in m.parameters()} if tp > 1 else set()
                local += sum(p.numel() / tp if id(p) in tp_sharded else _fsdp_numel(p.shape, dp)
                             for p in blk.parameters())
            if layers.start == 0:
                local += _fsdp_numel(model.embed_tokens.weight.shape, dp)
            if layers.stop == L:
                local += sum(_fsdp_numel(p.shape, dp) for p in model.norm.parameters())
                local += 0 if mc.tie_word_embeddings else _fsdp_numel(model.lm_head.weight.shape, dp)
            gathers = N * local * pbytes  # once per backward (kept through it)
            scatters = (N if pp > 1 else 1) * local * gbytes  # once per step (per window with PP)
            total += gathers + scatters
        out["dp"] = total * tp * dp  # every (dp, tp) coordinate holds each stage once
    # ---- pipeline
    if pp > 1:
        out["pp"] = dp * tp * 2 * (layout.num_stages - 1) * B * S * C * abytes
        if mc.tie_word_embeddings:
            out["pp"] += 2 * dp * tp * model.embed_tokens.weight.numel() * gbytes / (dp if fsdp else 1)
    return out


# ------------------------------------------------------------------------------------------- measurement
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, cfg_dict: dict, port: int, out_dir: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from omegaconf import OmegaConf

    from ltm_core.config import DataConfig, OptimConfig
    from ltm_core.configuration import model_config, to_dict
    from ltm_core.parallel.comm import CommCounter
    from ltm_core.parallel.env import init_distributed, shutdown
    from ltm_core.parallel.layout import resolve_layout, uses_native
    from ltm_core.training import build_optimizer, windowed_backward

    cfg = OmegaConf.create(cfg_dict)
    env = init_distributed(str(cfg.trainer.accelerator))
    layout = resolve_layout(cfg, env.world)
    mc, data = model_config(cfg), DataConfig(**to_dict(cfg.data))
    optim = OptimConfig(**to_dict(cfg.optim))
    if uses_native(cfg):
        from ltm_core.parallel.build import build_parallel_model
        from ltm_core.parallel.grads import clip_grads_, grad_norm, sync_tied_embeddings
        from ltm_core.parallel.trainer import train_batch

        pm = build_parallel_model(mc, layout, env.device, str(cfg.precision.lightning), int(cfg.seed),
                                  data.batch_size)
        optimizers = [build_optimizer(p, optim) for p in pm.parts]
        for opt in optimizers:
            if len({type(p).__name__ for g in opt.param_groups for p in g["params"]}) > 1:
                for g in opt.param_groups:
                    g["foreach"] = False
        dp_rank = pm.coordinate("dp")

        def step(ids, labels):
            train_batch(pm, ids, labels, 1.0, sync=True)
            sync_tied_embeddings(pm)
            clip_grads_(pm, optim.grad_clip or 1e9, grad_norm(pm))
            for o in optimizers:
                o.step()
                o.zero_grad(set_to_none=True)
    else:  # Lightning's DDP, reproduced: DistributedDataParallel and one backward per window
        import lightning as L

        from ltm_core.model import TitanModel

        L.seed_everything(int(cfg.seed), verbose=False)
        model = TitanModel(mc).to(env.device)
        net = model
        if env.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=mc.use_memory)
            net.config = model.config
        optimizers = [build_optimizer(model, optim)]
        dp_rank = env.rank

        def step(ids, labels):
            windowed_backward(net, ids, labels)
            if optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(1000 + dp_rank)
    batches = [torch.randint(0, 256, (data.batch_size, data.seq_len + 1), generator=gen) for _ in range(steps + 1)]
    batches = [(b[:, :-1].to(env.device), b[:, 1:].to(env.device)) for b in batches]
    step(*batches[0])  # warm-up: lazy initialisation of FSDP / pipeline buffers
    counters, times = [], []
    for ids, labels in batches[1:]:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with CommCounter(min_bytes=SCALAR_BYTES) as comm:
            step(ids, labels)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        counters.append(comm)
    result = {"rank": env.rank, "bytes": {}, "counts": {}, "step_s": sum(times) / len(times)}
    for c in counters:
        for k, v in c.bytes.items():
            result["bytes"][k] = result["bytes"].get(k, 0) + v / len(counters)
        for k, v in c.counts.items():
            result["counts"][k] = result["counts"].get(k, 0) + v / len(counters)
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown(env)


def _measure(cfg, world: int, steps: int, timeout_s: float = 900) -> list[dict]:
    """Run the preset's `world` processes (plain subprocesses: no re-import of the caller's main module)."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from ltm_core.errors import LtmError

    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    with tempfile.TemporaryDirectory(prefix="ltm-bench-parallel-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(cfg_dict))
        port = _free_port()
        code = "import sys; from ltm_core.parallel.bench import _worker_main; _worker_main(*sys.argv[1:])"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port), tmp, str(steps)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        deadline = time.time() + timeout_s
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise LtmError(f"bench error: {cfg.parallel.name} did not finish within {timeout_s:.0f} s") from None
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode]
        if failed:
            tail = "; ".join(logs[failed[0][0]].strip().splitlines()[-3:])
            raise LtmError(f"bench error: {cfg.parallel.name}: rank {failed[0][0]} exited with code "
                           f"{failed[0][1]} ({tail})")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def _worker_main(rank: str, world: str, port: str, tmp: str, steps: str) -> None:
    cfg_dict = json.loads(Path(tmp, "config.json").read_text())
    _worker(int(rank), int(world), cfg_dict, int(port), tmp, int(steps))


def bench_parallel(presets: Sequence[str] = DEFAULT_PRESETS, overrides: Iterable[str] = (), steps: int = 1,
                   use_defaults: bool = True,
                   progress: Optional[Callable[[int, int, str], None]] = None) -> list[dict[str, Any]]:
    """One row per preset: measured and analytic communication volume (bytes per training step, all ranks).
    Every preset's config is composed (and checked) before the first is measured. progress(done, total, label):
    called before each preset with the presets done so far, and once at the end."""
    from ltm_core.configuration import compose
    from ltm_core.errors import ConfigError
    from ltm_core.parallel.layout import planned_world_size, resolve_layout

    if steps <= 0:
        raise ConfigError("steps", f"must be positive, got {steps}")
    base = list(BENCH_OVERRIDES) if use_defaults else []
    configs = [(preset, compose([f"parallel={preset}", *base, *overrides])) for preset in presets]
    report = progress or (lambda done, total, label: None)
    rows = []
    for preset, cfg in configs:
        world = planned_world_size(cfg)
        report(len(rows), len(configs), f"{preset} ({world} processes)")
        layout = resolve_layout(cfg, world)
        analytic = analytic_volume(cfg, layout)
        ranks = _measure(cfg, world, steps) if world > 1 else [{"bytes": {}, "counts": {}, "step_s": 0.0}]
        by_kind: dict[str, float] = {}
        counts: dict[str, float] = {}
        for r in ranks:
            for k, v in r["bytes"].items():
                by_kind[k] = by_kind.get(k, 0) + v
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0) + v
        measured = sum(v for k, v in by_kind.items() if k not in ("recv", "scalars"))
        total = sum(analytic.values())
        rows.append({
            "preset": preset, "world": world, "layout": layout.describe(),
            "measured_bytes": measured, "analytic_bytes": total,
            "ratio": measured / total if total else (1.0 if measured == 0 else math.inf),
            "analytic_by_dim": analytic, "measured_by_kind": by_kind, "calls_by_kind": counts,
            "step_s": max(r["step_s"] for r in ranks),
        })
    report(len(rows), len(configs), "")
    return rows


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def rows_table(rows: list[dict[str, Any]], title: Optional[str] = None):
    """A rich Table of bench_parallel rows."""
    from rich.table import Table

    table = Table(title=title or "communication per training step (payload bytes, all ranks)")
    for col in ("preset", "layout", "measured", "analytic", "measured/analytic", "by collective", "step"):
        table.add_column(col, justify="right" if col in ("measured", "analytic", "measured/analytic", "step")
                         else "left")
    for r in rows:
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(r["measured_by_kind"].items()) if k != "recv")
        table.add_row(r["preset"], r["layout"], format_bytes(r["measured_bytes"]), format_bytes(r["analytic_bytes"]),
                      f"{r['ratio']:.3f}", kinds or "-", f"{r['step_s'] * 1e3:.0f} ms")
    return table
