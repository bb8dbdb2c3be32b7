"""What the machine gives a run: cores (affinity, cgroup quota), free memory, torch threads, and the refusal of a
launch the machine cannot run (`parallel.force=true` overrides it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltm_core import resources
from ltm_core.configuration import compose
from ltm_core.errors import ConfigError
from ltm_core.resources import (CpuBudget, available_cpus, available_memory, busy_cpus, cgroup_cpu_limit,
                                check_fits_machine, choose_threads, cpu_budget, estimate_process_bytes, worker_threads)

from support import GLIBC, TINY, run_ltm


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


def test_cgroup_cpu_quota_v2_v1_and_none(tmp_path):
    root, proc = _cgroup(tmp_path / "v2", "0::/job\n", {"job/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5  # the job's own quota; the root's "max" is no limit
    root, proc = _cgroup(tmp_path / "v2-parent", "0::/a/b\n", {"a/cpu.max": "300000 100000\n",
                                                               "a/b/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 3.0  # a parent's quota applies to its children
    root, proc = _cgroup(tmp_path / "v1", "4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n",
                         {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "200000\n",
                          "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == 2.0
    root, proc = _cgroup(tmp_path / "v1-none", "4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                                    "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) is None


def test_available_cpus_takes_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "250000 100000\n"})
    assert available_cpus(root, proc) == 2  # 2.5 CPUs of quota: two threads keep busy without being throttled
    root, proc = _cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert available_cpus(root, proc) == 6  # the affinity (taskset) alone
    root, proc = _cgroup(tmp_path / "tiny", "0::/\n", {"cpu.max": "50000 100000\n"})
    assert available_cpus(root, proc) == 1  # at least one


def test_available_memory_is_the_tighter_of_kernel_and_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    root, proc = _cgroup(tmp_path, "0::/job\n", {"job/memory.max": str(3 * 2**30), "job/memory.current": str(2**30)})
    assert available_memory(root, proc, meminfo) == 2 * 2**30
    root, proc = _cgroup(tmp_path / "free", "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"})
    assert available_memory(root, proc, meminfo) == 8000000 * 1024


def test_busy_cpus_reads_the_other_processes_share_of_each_core(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    #                     user nice system idle iowait irq softirq steal
    stat.write_text("cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\n"
                    "cpu2 0 0 0 0 0 0 0 0\n")
    later = "cpu  0 0 0 0 0 0 0 0\ncpu0 190 0 0 110 0 0 0 0\ncpu1 100 0 0 200 0 0 0 0\ncpu2 50 0 0 50 0 0 0 0\n"
    monkeypatch.setattr(resources.time, "sleep", lambda s: stat.write_text(later))
    assert busy_cpus({0, 1}, stat=stat) == pytest.approx(0.9)  # cpu0 90 % busy, cpu1 idle; cpu2 is not ours
    assert busy_cpus({0, 1}, stat=tmp_path / "missing") == 0.0


def test_budget_says_when_other_processes_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda *a: 2)
    monkeypatch.setattr(resources, "busy_cpus", lambda cpus, interval: 1.8)
    budget = cpu_budget()
    assert budget == CpuBudget(cores=2, busy=1.8)
    assert "trainer.threads=1 or taskset" in budget.describe(2)  # 2 threads beside other busy processes
    assert "taskset" not in budget.describe(1)
    assert "taskset" not in CpuBudget(cores=2, busy=0.1).describe(2)


def test_threads_explicit_then_environment_then_cores(monkeypatch):
    """The automatic count is the available cores, never the passing load: the thread count changes the order of
    floating-point sums, and a resumed run must match an uninterrupted one bitwise (test_resume_is_exact failed
    when the count followed the load)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda *a: 8)
    monkeypatch.setattr(resources, "busy_cpus", lambda *a, **k: 7.5)  # not consulted
    assert choose_threads(None) == 8
    assert choose_threads(None, processes=2) == 4  # local processes share the cores
    assert choose_threads(None, processes=16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, processes=2) == 3  # what the user exported wins over the guess
    assert choose_threads(5) == 5  # trainer.threads wins over both
    for bad in (0, -2, True):
        with pytest.raises(ConfigError, match="trainer.threads: must be a positive integer or null"):
            choose_threads(bad)


def test_worker_threads_sets_and_restores_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(resources, "available_cpus", lambda *a: 8)
    with worker_threads(None, 4) as threads:
        assert threads == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with worker_threads(None, 4):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_trainer_threads_key_composes():
    assert compose([]).trainer.threads is None
    assert compose(["trainer.threads=2"]).trainer.threads == 2
    with pytest.raises(ConfigError, match="trainer.threads"):
        compose(["trainer.threads=many"])


def test_more_processes_than_cores_is_refused_unless_forced(monkeypatch):
    monkeypatch.setattr(resources, "available_cpus", lambda *a: 2)
    monkeypatch.setattr(resources, "available_memory", lambda *a: 64 * 2**30)
    grid = ["model.hidden_size=128", "model.num_attention_heads=8", "model.num_hidden_layers=4",
            "trainer.accelerator=cpu"]
    cfg = compose(["model=base", "parallel=tp4_pp2", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError) as err:
        check_fits_machine(cfg, 8, 10**8, on_cpu=True)
    message = str(err.value)
    assert message.startswith("config error: parallel: parallel=tp4_pp2 starts 8 processes (dp=1 × tp=4 × pp=2)")
    assert "2 CPU core(s) available" in message and "parallel.force=true" in message and "\n" not in message
    check_fits_machine(compose(["model=base", "parallel=tp4_pp2", "parallel.force=true"]), 8, 10**8, on_cpu=True)
    check_fits_machine(cfg, 8, 10**8, on_cpu=False)  # GPU runs are not counted against CPU cores
    for preset in ("tp2", "pp2", "fsdp", "ddp"):  # what the parallel tests start on a 2-core machine
        check_fits_machine(compose([f"parallel={preset}", *grid]), 2, 10**6, on_cpu=True)


def test_memory_beyond_what_is_free_is_refused(monkeypatch):
    monkeypatch.setattr(resources, "available_cpus", lambda *a: 64)
    monkeypatch.setattr(resources, "available_memory", lambda *a: 2 * 2**30)
    cfg = compose(["model=base", "parallel=ddp", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError) as err:
        check_fits_machine(cfg, 2, 101_935_884, on_cpu=True)
    message = str(err.value)
    assert "2 processes of parallel=ddp need about" in message and "2.0 GiB is free" in message, message
    assert "101,935,884 parameters" in message and "parallel.force=true" in message
    check_fits_machine(compose(["parallel=single", "trainer.accelerator=cpu"]), 1, 653_442, on_cpu=True)  # tiny fits


def test_process_estimate_parts():
    runtime = estimate_process_bytes(0, 1, 0, 0, 0, 0)
    assert runtime == resources.RUNTIME_BYTES
    state = estimate_process_bytes(10**6, 1, 0, 0, 0, 0) - runtime
    assert state == 16 * 10**6  # weights, gradients, two AdamW moments in fp32
    assert estimate_process_bytes(10**6, 4, 0, 0, 0, 0) - runtime == state / 4  # sharded over tp × pp (× dp: FSDP)
    acts = estimate_process_bytes(0, 1, 8, 128, 64, 2) - runtime
    assert acts == 4 * 16 * 8 * 128 * 64 * 2
    assert estimate_process_bytes(0, 1, 8, 128, 64, 2, tp=2) - runtime == acts / 2


def test_cli_refuses_more_processes_than_cores_before_writing(tmp_path):
    """parallel=ddp with one process more than this machine's cores: one line, exit 2, nothing written."""
    cores = available_cpus()
    out = tmp_path / "run"
    result = run_ltm("train", *TINY, "parallel=ddp", f"parallel.devices={cores + 1}", f"output_dir={out}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"starts {cores + 1} processes" in lines[0] and "parallel.force=true" in lines[0], lines
    assert not out.exists()

# tensors of 16 and 64 MiB freed: how much of each the process still holds resident (MiB), and whether the
# setting applied
FREED = """
import os, sys, torch
from ltm_core.resources import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
given_back = []
for mib in (16, 64):
    x = torch.ones(mib * 2**18)
    held = resident()
    del x
    given_back.append(held - resident())
print(applied, *given_back)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_keep_freed_memory_holds_what_a_step_frees_unless_the_user_chose():
    """With the setting a freed 16 MiB tensor stays in the heap for the next step (a training step reuses it without
    faulting its pages in again), while a 64 MiB one, above KEPT_ALLOCATION_BYTES, still goes back to the kernel;
    glibc's default gives both back; a user's own malloc settings win."""
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}

    def run(mode: str, **env: str) -> tuple[bool, float, float]:
        out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True,
                             env={**clean, **env}).stdout.split()
        return out[0] == "True", float(out[1]), float(out[2])

    assert resources.KEPT_ALLOCATION_BYTES == 32 * 2**20
    applied, small, large = run("keep")
    assert applied and small < 2 and large > 60, (small, large)
    applied, small, large = run("default")
    assert not applied and small > 14 and large > 60, (small, large)
    for env in ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, {"MALLOC_ARENA_MAX_": "2"}):
        applied, small, large = run("keep", **env)
        assert not applied and small > 14, (env, small)


def test_cpu_training_keeps_freed_memory(tmp_path, monkeypatch):
    """`fit` on CPU applies the setting before the run (ltm bench model's CPU rows do too: their keeps_freed_memory)."""
    import ltm_core.lit
    import ltm_core.train

    calls = []
    monkeypatch.setattr(ltm_core.train, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(ltm_core.lit, "fit_lightning", lambda cfg, *a, **k: calls.append("fit") or tmp_path)
    ltm_core.train.fit(compose(TINY + [f"output_dir={tmp_path / 'run'}"]))
    assert calls == ["kept", "fit"]
