"""What this machine can give a run: CPU cores (affinity and cgroup quota, and how many other processes keep
busy), free memory, torch's thread count, and the check that refuses a local launch the machine cannot run.

Nothing here imports torch at module level: `ltm train` calls these before it starts any process.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from ltm_core.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# resident memory of one training process before its model: Python, torch, Lightning and ltm imported (measured:
# 417 MiB, `import torch, lightning, ltm_core.train` then ru_maxrss, 2-core x86_64, torch 2.13 CPU)
RUNTIME_BYTES = 400 * 2**20
# fp32 bytes held per parameter in training: weights, gradients and AdamW's two moments
STATE_BYTES_PER_PARAM = 16
# fp32 activations kept for backward per token, hidden unit and layer (q, k, v, attention output, SwiGLU's three
# projections, norms, residuals: about 16 values); attention scores and the memory come on top
ACTIVATION_VALUES = 16


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> Iterator[Path]:
    """The cgroup folders of this process for `controller` (v2: the unified tree; v1: the controller's mount),
    from its own group up to the root: a parent's limit also applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    seen = set()
    for line in lines + ["0::/"]:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = [c for c in controllers.split(",") if c]
        if names and controller not in names:
            continue
        bases = [root] if not names else [root / controllers, root / controller]
        for base in bases:
            folder = Path(path.lstrip("/"))
            while True:
                candidate = base / folder
                if candidate not in seen:
                    seen.add(candidate)
                    yield candidate
                if folder == Path("."):
                    break
                folder = folder.parent


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[float]:
    """CPUs granted by the cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), or None."""
    limits = []
    for folder in _cgroup_dirs(root, proc_cgroup, "cpu"):
        try:
            if (folder / "cpu.max").is_file():
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    limits.append(int(quota) / int(period))
            elif (folder / "cpu.cfs_quota_us").is_file():
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    limits.append(quota / int((folder / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), capped by the cgroup quota (containers,
    `docker --cpus`); at least 1. `os.cpu_count()` counts the machine's cores whatever the process is allowed."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def _meminfo_available(meminfo: Path) -> Optional[int]:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def available_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                     meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """Bytes a new process can still take: the kernel's MemAvailable, capped by the cgroup's limit minus its usage
    (v2 `memory.max` - `memory.current`, v1 `memory.limit_in_bytes` - `memory.usage_in_bytes`); None if unknown."""
    free = [m for m in (_meminfo_available(meminfo),) if m is not None]
    for folder in _cgroup_dirs(root, proc_cgroup, "memory"):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            try:
                limit = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                free.append(max(0, int(limit) - usage))
    return min(free) if free else None


def busy_cpus(cpus: set[int], interval: float = 0.25, stat: Path = Path("/proc/stat")) -> float:
    """Cores of `cpus` that other processes keep busy: their non-idle share over `interval` seconds, read from
    /proc/stat while this process sleeps (so it does not count itself); 0.0 where /proc/stat is missing."""
    def sample() -> dict[int, tuple[int, int]]:
        times = {}
        for line in stat.read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])
        return times

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        total, idle = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        busy += 1 - idle / total if total > 0 else 0.0
    return busy


@dataclass(frozen=True)
class CpuBudget:
    cores: int  # available to this process: affinity, capped by the cgroup quota
    busy: float  # cores of its affinity that other processes kept busy when measured

    def describe(self, threads: int) -> str:
        text = f"{self.cores} cores available, {self.busy:.1f} busy with other processes"
        if threads > 1 and self.busy >= 0.5:  # spinning OpenMP threads then wait on the other processes
            text += ": with other jobs on these cores, trainer.threads=1 or taskset runs much faster (docs/cli.md)"
        return text


def cpu_budget(interval: float = 0.25) -> CpuBudget:
    """The cores this process may use and how many of them other processes keep busy right now."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    return CpuBudget(available_cpus(), min(busy_cpus(cpus, interval), float(len(cpus))))


def check_threads(requested: Any) -> Optional[int]:
    """`trainer.threads`: a positive integer, or None (auto)."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0):
        raise ConfigError("trainer.threads", f"must be a positive integer or null (auto), got {requested!r}")
    return requested


def choose_threads(requested: Optional[int], processes: int = 1) -> int:
    """torch's intra-op threads for one of `processes` local processes: `trainer.threads` when set; else
    OMP_NUM_THREADS when set; else the available cores (affinity, cgroup quota) shared evenly, at least 1.

    The automatic count does not follow the machine's load, though other busy processes slow OpenMP's spinning
    threads many times over: the thread count changes the order of floating-point sums, so a run and its resumed
    twin (or two runs of one config) must not get different counts from a passing load. `CpuBudget.describe`
    says when other processes are busy; `trainer.threads` or `taskset` then choose (docs/cli.md)."""
    if check_threads(requested) is not None:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, available_cpus() // max(1, processes))


@contextmanager
def worker_threads(requested: Optional[int], processes: int) -> Iterator[int]:
    """OMP_NUM_THREADS for the `processes` workers a local launch starts (they inherit it): the available cores
    shared among them; the user's own OMP_NUM_THREADS is kept. Restored after."""
    before = os.environ.get("OMP_NUM_THREADS")
    threads = choose_threads(requested, processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_ALLOCATION_BYTES = 32 * 2**20  # blocks up to this size come from the heap and are reused there (glibc's
# largest adaptive mmap threshold; with 1 GiB `model=small`'s full-causal step at 32K tokens grew its resident size
# by 9.9 GiB instead of 7.2, and the segment-local row of that bench run was OOM-killed on a 24 GiB machine)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the heap gives memory back to the kernel only past this much free at its top


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep what a CPU training step frees for the next step, instead of giving it back to the
    kernel and faulting it in again page by page: blocks up to KEPT_ALLOCATION_BYTES come from the heap from the
    first step on (glibc's threshold adapts up to that size only as large blocks are freed), and the heap is trimmed
    only past TRIM_THRESHOLD_BYTES free (by default every step's freed activations at its top went back). Larger
    blocks are still mapped and unmapped each time, so the resident size stays that of the live tensors plus the
    heap's free blocks (measured in docs/cli.md and docs/benchmarks.md).

    Does nothing where the C library is not glibc, or where the user chose malloc's behaviour (`malloc_chosen`).
    Returns whether the settings were applied."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or malloc_chosen(os.environ):
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_ALLOCATION_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def malloc_chosen(env: Mapping[str, str]) -> bool:
    """Whether `env` sets malloc's behaviour: glibc tunables, MALLOC_*_ variables, or a preloaded allocator."""
    return bool("glibc.malloc" in env.get("GLIBC_TUNABLES", "") or env.get("LD_PRELOAD")
                or any(k.startswith("MALLOC_") and k.endswith("_") for k in env))


def set_threads(requested: Optional[int], processes: int = 1) -> int:
    """Apply `choose_threads` to torch; returns the count."""
    import torch

    threads = choose_threads(requested, processes)
    torch.set_num_threads(threads)
    return threads


def estimate_process_bytes(params: int, shards: int, batch: int, window: int, hidden: int, layers: int,
                           tp: int = 1) -> int:
    """Rough resident memory of one training process: the runtime, the fp32 training state of its share of the
    parameters, and the activations of one backprop window of its layers (tensor parallelism splits most of them;
    without a memory the whole sequence is one window)."""
    state = STATE_BYTES_PER_PARAM * params / max(1, shards)
    activations = 4 * ACTIVATION_VALUES * batch * window * hidden * layers / max(1, tp)
    return int(RUNTIME_BYTES + state + activations)


def check_fits_machine(cfg: Any, world: int, params: int, on_cpu: bool) -> None:
    """Refuse, in one line, a CPU run whose processes outnumber the available cores or whose estimated memory
    exceeds what is free. `parallel.force=true` starts it anyway. GPU runs are not checked here."""
    if not on_cpu or bool(cfg.parallel.get("force", False)):
        return
    from ltm_core.parallel.layout import resolve_layout, uses_native

    layout = resolve_layout(cfg, world)
    cores = available_cpus()
    name = cfg.parallel.get("name") or "parallel"
    if world > cores:
        raise ConfigError("parallel", f"parallel={name} starts {world} processes (dp={layout.dp} × tp={layout.tp} × "
                          f"pp={layout.pp}) but this machine has {cores} CPU core(s) available: use a layout with at "
                          f"most {cores} processes (e.g. parallel=single), or parallel.force=true to start them anyway")
    free = available_memory()
    if free is None:
        return
    fsdp = uses_native(cfg) and layout.dp > 1
    model = cfg.model
    per_process = estimate_process_bytes(
        params, shards=layout.tp * layout.pp * (layout.dp if fsdp else 1), batch=int(cfg.data.batch_size),
        window=int(model.segment_length) * int(model.bptt_segments) * int(model.get("windows_per_pass", 1))
        if model.use_memory else int(cfg.data.seq_len),  # the tokens of one backward (at most)
        hidden=int(model.hidden_size),
        layers=math.ceil(int(model.num_hidden_layers) / layout.pp), tp=layout.tp)
    need = world * per_process
    if need > free:
        who = f"{world} processes of parallel={name} need" if world > 1 else "this run needs"
        each = f", {per_process / 2**30:.1f} GiB each" if world > 1 else ""
        raise ConfigError("parallel", f"{who} about {need / 2**30:.1f} GiB (runtime, training state of "
                          f"{params:,} parameters, activations{each}) but {free / 2**30:.1f} GiB is free: use a "
                          "smaller model, batch or layout, or parallel.force=true to start anyway")
