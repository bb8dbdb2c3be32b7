"""`fit_parallel(cfg, corpus)`: the torchtitan-style training loop for FSDP2 / tensor / pipeline parallel runs.

One process per rank (started by `ltm train`, torchrun, SLURM or mpirun). Semantics are those of the Lightning
path (`ltm_core.training`): a batch is read in passes of `windows_per_pass` BPTT windows (`segment_length ×
bptt_segments` tokens each), one backward per pass with the memory detached between windows (`windowed_backward`;
with pipeline parallelism each window goes through `schedule.step`), gradients of `accumulate_grad_batches` batches are summed, clipped to
`optim.grad_clip` by their global norm, and AdamW (`build_optimizer`) with the warm-up + cosine schedule
(`build_scheduler`) steps. Data: `RandomWindows` with rank = the data-parallel rank, so the global batch of a
dp-way run is the batch of a single-process run with dp × data.batch_size samples.

Output folder (as train.py's docstring): config.yaml, metrics.csv (train/loss, train/lr, train/tokens_per_s,
val/loss, val/bpb), checkpoints/last.ckpt and best.ckpt (consolidated single-device checkpoints) and
checkpoints/dcp/ (the sharded checkpoint that `resume=auto` continues from exactly).
"""

from __future__ import annotations

import csv
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.console import Console

from ltm_core.config import DataConfig, OptimConfig
from ltm_core.configuration import model_config, to_dict
from ltm_core.console import generate_command
from ltm_core.data import CORPORA, Corpus, EvenWindows, RandomWindows, load_corpus, unigram_bpb
from ltm_core import run_guard
from ltm_core.errors import CheckpointError, ConfigError, Interrupted
from ltm_core.parallel import checkpoint as pckpt
from ltm_core.parallel.build import ParallelModel, build_parallel_model
from ltm_core.parallel.env import DistEnv, end_group, init_distributed
from ltm_core.parallel.grads import LossScaler, clip_grads_, grad_norm, sync_tied_embeddings
from ltm_core.parallel.layout import resolve_layout
from ltm_core.training import (LN2, Diverged, build_optimizer, build_scheduler, rebase_lr, window_span,
                               windowed_backward)

console = Console()
METRIC_COLUMNS = ["epoch", "step", "train/loss", "train/lr", "train/tokens_per_s", "train/bad_steps", "train/aux_loss",
                  "val/loss", "val/bpb"]


# ------------------------------------------------------------------------------------------------ one batch
def _window_span(pm: ParallelModel, seq_len: int) -> int:
    return window_span(pm.config, seq_len)


def pipeline_batch(pm: ParallelModel, input_ids: torch.Tensor, labels: torch.Tensor, loss_scale: float,
                   train: bool = True) -> torch.Tensor:
    """Forward (and backward) of one batch through the pipeline, window by window. Returns the token loss sum
    on ranks holding the last stage (0 elsewhere)."""
    n_tokens = (labels != -100).sum().clamp(min=1)
    pm.loss_ctx.update(scale=loss_scale / n_tokens, sums=[])
    for part in pm.parts:
        part.reset(clear_memory=True)
    span = pm.config.segment_length * pm.config.bptt_segments  # one window per step: the stages' fixed shapes
    for start in range(0, input_ids.shape[1], span):
        for part in pm.parts:
            part.reset(clear_memory=False)
        x, y = input_ids[:, start:start + span], labels[:, start:start + span]
        args = (x,) if pm.has_first else ()
        kwargs: dict[str, Any] = {"target": y, "losses": []} if pm.has_last else {}
        if train:
            pm.schedule.step(*args, return_outputs=False, **kwargs)
        else:
            pm.schedule.eval(*args, return_outputs=False, **kwargs)
    sums = pm.loss_ctx["sums"]
    return torch.stack(sums).sum() if sums else torch.zeros((), device=input_ids.device)


def train_batch(pm: ParallelModel, input_ids: torch.Tensor, labels: torch.Tensor, loss_scale: float,
                sync: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward + backward of one batch; returns its mean token loss over the data-parallel group, and the memory
    writes' summed auxiliary loss (over the group too; None without one, and with pipeline stages, where each
    stage applies its own)."""
    aux = None
    for part in pm.parts:  # the writes' auxiliary losses, scaled as the token loss (per pipeline microbatch)
        part.aux_weight = loss_scale / (pm.layout.microbatches if pm.layout.pp > 1 else 1)
    if pm.layout.pp > 1:
        n_tokens = (labels != -100).sum().clamp(min=1)
        loss = pipeline_batch(pm, input_ids, labels, loss_scale) / n_tokens
        dist.all_reduce(loss, group=pm.group("pp"))  # only the last stage has it
    else:
        model = pm.parts[0]
        windows = math.ceil(input_ids.shape[1] / _window_span(pm, input_ids.shape[1]))
        done = [0]

        def backward(loss: torch.Tensor) -> None:
            done[0] += 1
            if pm.fsdp:  # reduce-scatter once, after the last window of the last accumulated batch
                model.set_requires_gradient_sync(sync and done[0] == windows)
            loss.backward()

        loss, aux = windowed_backward(model, input_ids, labels, backward, loss_scale)
    if pm.layout.dp > 1:
        pair = torch.stack([loss.detach(), torch.zeros_like(loss) if aux is None else aux.detach().to(loss.dtype)])
        dist.all_reduce(pair, group=pm.group("dp"))
        loss, aux = pair[0] / pm.layout.dp, None if aux is None else pair[1] / pm.layout.dp
    return loss.detach(), None if aux is None else aux.detach()


@torch.no_grad()
def validate(pm: ParallelModel, corpus: Corpus, data_cfg: DataConfig) -> float:
    """Mean token loss over `data.val_samples` evenly spread validation windows (every rank takes part)."""
    windows = EvenWindows(corpus.val, data_cfg.seq_len, data_cfg.val_samples)
    B = data_cfg.batch_size
    total = torch.zeros((), device=pm.device, dtype=torch.float64)
    count = 0
    for part in pm.parts:
        part.eval()
    try:
        for start in range(0, len(windows), B):
            rows = [windows[i] for i in range(start, min(start + B, len(windows)))]
            ids = torch.stack([r[0] for r in rows])
            labels = torch.stack([r[1] for r in rows])
            count += labels.numel()
            if pm.layout.pp > 1 and len(rows) < B:  # fixed pipeline shapes: pad with ignored rows
                pad = B - len(rows)
                ids = torch.cat([ids, ids[:1].expand(pad, -1)])
                labels = torch.cat([labels, torch.full((pad, labels.shape[1]), -100, dtype=labels.dtype)])
            ids, labels = ids.to(pm.device), labels.to(pm.device)
            if pm.layout.pp > 1:
                s = pipeline_batch(pm, ids, labels, 1.0, train=False)
                dist.all_reduce(s, group=pm.group("pp"))
            else:
                logits = pm.parts[0](ids).logits
                s = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                    reduction="sum")
            total += s.double()
    finally:
        for part in pm.parts:
            part.train()
    return float(total) / max(count, 1)


# ------------------------------------------------------------------------------------------------ logging
class MetricsCSV:
    """OUTPUT_DIR/metrics.csv, written by global rank 0; a resumed run appends."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.columns = METRIC_COLUMNS
        if enabled and path.is_file():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            self.columns = header + [c for c in METRIC_COLUMNS if c not in header] if header else METRIC_COLUMNS
            if header != self.columns:  # a new column: rewrite the header once
                rows = list(csv.DictReader(open(path, newline="")))
                self._write(rows, mode="w")
        elif enabled:
            self._write([], mode="w")

    def _write(self, rows: list[dict], mode: str) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, **values: float) -> None:
        if self.enabled:
            row = {"epoch": 0, "step": step - 1, **{k.replace("__", "/"): v for k, v in values.items()}}
            self._write([row], mode="a")


# ------------------------------------------------------------------------------------------------ the loop
def _batches(corpus: Corpus, data_cfg: DataConfig, start: int, rank: int, world: int):
    stream = iter(RandomWindows(corpus.train, data_cfg.seq_len, data_cfg.seed, start, rank, world))
    while True:
        rows = [next(stream) for _ in range(data_cfg.batch_size)]
        yield torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _warm_start(pm: ParallelModel, path: Path) -> dict[str, Any]:
    """Weights (not optimizer state) from a single-device .ckpt (consolidated or Lightning's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ltm_core.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path, mmap=True)  # every rank reads it: one copy in the page cache
    full = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for part in pm.parts:
        try:
            state = {name: full[name].reshape(p.shape) for name, p in part.state_dict().items()}
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint error: {path} does not fit the model config ({exc})") from None
        set_model_state_dict(part, state, options=StateDictOptions(full_state_dict=True))
    return {"step": int(ckpt.get("global_step", 0)), "samples_seen": int(ckpt.get("samples_seen", 0))}


def fit_parallel(cfg: DictConfig, corpus: Optional[Corpus] = None) -> Path:
    """Train as configured in this process (one rank); returns OUTPUT_DIR/checkpoints/last.ckpt. SIGINT/SIGTERM save
    a checkpoint after the current step on every rank and raise Interrupted (docs/reliability.md)."""
    env = init_distributed(str(cfg.trainer.accelerator))
    ok = False
    try:
        with run_guard.Interrupts() as interrupts:
            result = _fit(cfg, corpus, env, interrupts)
        ok = True
        return result
    finally:
        if env.created_group:
            end_group(clean=ok)


def _fit(cfg: DictConfig, corpus: Optional[Corpus], env: DistEnv, interrupts: run_guard.Interrupts) -> Path:
    layout = resolve_layout(cfg, env.world)
    rank0 = env.rank == 0
    shared = [str(cfg.output_dir)]  # every rank writes its shards where rank 0 prepared the run folder
    dist.broadcast_object_list(shared, src=0)
    out = Path(shared[0])
    ckpt_dir = out / "checkpoints"
    model_cfg = model_config(cfg)
    data_cfg = DataConfig(**to_dict(cfg.data))
    optim_cfg = OptimConfig(**to_dict(cfg.optim))
    if corpus is None and data_cfg.name not in CORPORA:
        raise ConfigError("data.name", f"data={data_cfg.name} (a generated task) is not supported with "
                          "strategy=native presets yet; train it with parallel=single or parallel=ddp")
    corpus = corpus if corpus is not None else load_corpus(data_cfg)
    max_steps, accumulate = int(cfg.trainer.max_steps), int(cfg.trainer.accumulate_grad_batches)
    interval, log_every = int(cfg.trainer.val_check_interval), int(cfg.trainer.log_every_n_steps)
    precision = str(cfg.precision.lightning)
    if bool(cfg.trainer.deterministic):
        torch.use_deterministic_algorithms(True)

    pm = build_parallel_model(model_cfg, layout, env.device, precision, int(cfg.seed), data_cfg.batch_size)
    optimizers = [build_optimizer(p, optim_cfg) for p in pm.parts]
    for opt in optimizers:  # foreach kernels cannot mix DTensor and plain tensors in one list
        kinds = {type(p).__name__ for g in opt.param_groups for p in g["params"]}
        if len(kinds) > 1:
            for g in opt.param_groups:
                g["foreach"] = False
    schedule_steps = int(optim_cfg.schedule_steps or max_steps)
    schedulers = [build_scheduler(o, optim_cfg, schedule_steps) for o in optimizers]
    scaler = LossScaler(precision == "16-mixed")

    dist.barrier()  # rank 0 has prepared the output folder
    step, samples_seen, best, bad_steps = 0, 0, math.inf, 0
    source = [None, None]  # rank 0 decides what to resume from, so that every rank does the same
    if rank0:
        if cfg.resume == "auto" and pckpt.latest_dcp(out) is not None:
            source = ["dcp", str(pckpt.latest_dcp(out))]
        elif cfg.resume == "auto" and (ckpt_dir / "last.ckpt").is_file():
            source = ["weights", str(ckpt_dir / "last.ckpt")]
        elif cfg.resume not in (None, "auto"):
            source = ["weights", str(cfg.resume)]
    dist.broadcast_object_list(source, src=0)
    resumed_from = Path(source[1]) if source[1] else None
    if source[0] == "dcp":  # exact: weights, optimizer, schedule, data position, random streams
        state = pckpt.load(resumed_from, pm.parts, optimizers, env.device, layout.tp)
        step, samples_seen, best = int(state["step"]), int(state["samples_seen"]), float(state.get("best", math.inf))
        # samples_seen is per data-parallel rank: a resume with another dp goes on from the same global position
        samples_seen = samples_seen * int(state.get("layout", {}).get("dp", layout.dp)) // layout.dp
        bad_steps = int(state.get("bad_steps", 0))
        replaced = None
        for s, sd in zip(schedulers, state["schedulers"]):
            s.load_state_dict(sd)
            replaced = rebase_lr(s, optim_cfg.lr) or replaced  # a resume with another optim.lr takes it
        if replaced is not None and rank0:
            console.print(f"optim.lr={optim_cfg.lr:g} from step {step} (the checkpoint's schedule had {replaced:g})")
        scaler.load_state_dict(state.get("scaler", {}))
    elif source[0] == "weights":  # a single-device checkpoint: its weights, a fresh optimizer
        state = _warm_start(pm, resumed_from)
        step, samples_seen = state["step"], state["samples_seen"]
        with warnings.catch_warnings():  # fast-forward the LR schedule (no optimizer step has run yet)
            warnings.simplefilter("ignore")
            for s in schedulers:
                for _ in range(step):
                    s.step()

    if rank0:
        from ltm_core.train import parameter_count

        n_params = parameter_count(cfg)
        console.print(f"[bold]ltm train[/] -> {out}")
        console.print(f"parallel: {layout.describe()} on {env.world} {env.device.type} process(es) "
                      f"({env.backend}), precision {precision}")
        console.print(f"data: {corpus.description}; train {len(corpus.train):,} tokens, val {len(corpus.val):,}")
        console.print(f"model: {n_params:,} parameters, memory={'on' if model_cfg.use_memory else 'off'}, "
                      f"segment={model_cfg.segment_length}, bptt_segments={model_cfg.bptt_segments}")
        if resumed_from:
            console.print(f"resuming from {resumed_from} at step {step}")
        elif cfg.resume == "auto":
            console.print(f"resume=auto: no checkpoint in {ckpt_dir}; starting at step 0")
    if rank0:  # rows of steps after the checkpoint (or of a run killed before its first one) are logged again
        run_guard.drop_metrics_from(out / "metrics.csv", step)
    metrics = MetricsCSV(out / "metrics.csv", rank0)
    dp_rank = pm.coordinate("dp")
    batches = _batches(corpus, data_cfg, samples_seen * layout.dp, dp_rank, layout.dp)

    val_loss: Optional[float] = None
    tick = time.perf_counter()
    every = 60.0 * cfg.trainer.checkpoint_every_minutes if cfg.trainer.checkpoint_every_minutes else None
    max_bad, bad_in_a_row, last_save = int(cfg.trainer.max_bad_steps), 0, time.monotonic()
    check_grads = not scaler.enabled  # fp16: the loss scaler skips steps with inf gradients itself
    saved_step: Optional[int] = None  # the step of this run's newest last.ckpt

    def save(validated: bool, improved: bool = False) -> None:
        nonlocal last_save, saved_step
        train_state = {"step": step, "samples_seen": samples_seen, "best": best, "bad_steps": bad_steps,
                       "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(),
                       "layout": {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp}}
        path = pckpt.save(out, step, pm.parts, optimizers, train_state, env.device)
        if rank0:
            last = pckpt.consolidate(path, ckpt_dir / "last.ckpt", to_dict(cfg),
                                     {"val_loss": val_loss} if validated else None)
            if improved:
                with run_guard.atomic_file(ckpt_dir / "best.ckpt") as f:
                    f.write(last.read_bytes())
        dist.barrier()
        last_save, saved_step = time.monotonic(), step

    while step < max_steps:
        loss, aux = torch.zeros((), device=env.device), None
        for micro in range(accumulate):
            ids, labels = next(batches)
            ids, labels = ids.to(env.device), labels.to(env.device)
            batch_loss, batch_aux = train_batch(pm, ids, labels, scaler.scale / accumulate,
                                                sync=micro == accumulate - 1)
            loss += batch_loss
            if batch_aux is not None:
                aux = batch_aux if aux is None else aux + batch_aux
            samples_seen += ids.shape[0]
        sync_tied_embeddings(pm)
        norm = grad_norm(pm) if optim_cfg.grad_clip > 0 or scaler.enabled or check_grads else None
        # one collective decision per step: [non-finite loss or gradient, a signal came, a timed save is due]
        flags = torch.tensor([not bool(torch.isfinite(loss)) or (check_grads and not bool(torch.isfinite(norm))),
                              interrupts.requested, every is not None and time.monotonic() - last_save >= every],
                             dtype=torch.float32, device=env.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, signalled, due = (bool(f) for f in flags.tolist())
        if bad:  # skip: no optimizer or schedule step, the batch is dropped
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            bad_steps, bad_in_a_row = bad_steps + 1, bad_in_a_row + 1
            metrics.log(step + 1, train__bad_steps=bad_steps)
            if bad_in_a_row >= max_bad:
                err = Diverged(step + 1, bad_in_a_row)
                advice = run_guard.diverged_advice(cfg, ckpt_dir / "last.ckpt", saved_step, resumed_from)
                err.args = (f"{err}; {advice}",)
                raise err
        else:
            bad_in_a_row = 0
            do_step, norm = scaler.unscale(pm, norm) if (optim_cfg.grad_clip > 0 or scaler.enabled) else (True, None)
            if do_step:
                if optim_cfg.grad_clip > 0:
                    clip_grads_(pm, optim_cfg.grad_clip, norm)
                for opt in optimizers:
                    opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for s in schedulers:
                s.step()
            step += 1
            if step % log_every == 0 or step == max_steps:
                now = time.perf_counter()
                tokens = data_cfg.batch_size * data_cfg.seq_len * layout.dp * accumulate
                values = {"train__loss": float(loss / accumulate), "train__lr": schedulers[0].get_last_lr()[0],
                          "train__tokens_per_s": tokens * (step % log_every or log_every) / max(now - tick, 1e-9),
                          "train__bad_steps": bad_steps}
                if aux is not None:  # the memory's auxiliary loss (e.g. the tokens memory's importance penalty)
                    values["train__aux_loss"] = float(aux / accumulate)
                tick = now
                metrics.log(step, **values)
                if rank0 and cfg.trainer.progress:
                    console.print(f"step {step}/{max_steps}  loss {values['train__loss']:.4f}  "
                                  f"lr {values['train__lr']:.2e}  {values['train__tokens_per_s']:,.0f} tok/s")
            if step % interval == 0 or step == max_steps:
                val_loss = validate(pm, corpus, data_cfg)
                improved = val_loss < best
                best = min(best, val_loss)
                save(validated=True, improved=improved)
                if rank0:
                    metrics.log(step, val__loss=val_loss, val__bpb=val_loss / LN2)
                tick = time.perf_counter()
        if (signalled or due) and saved_step != step:
            save(validated=False)
        if signalled:
            signum = interrupts.signum or int(signal.SIGTERM)  # another rank received it
            raise Interrupted(run_guard.interrupted_message(signum, step, ckpt_dir / "last.ckpt",
                                                            run_guard.resume_command(cfg)), signum)
    last = ckpt_dir / "last.ckpt"
    if rank0:
        if val_loss is not None:
            console.print(f"validation: loss {val_loss:.4f}, {val_loss / LN2:.3f} bits/byte "
                          f"(byte-unigram baseline {unigram_bpb(corpus):.3f} bits/byte)")
        console.print(f"checkpoint: {last}")
        console.print(generate_command(last, corpus.val), soft_wrap=True, highlight=False)
    return last


