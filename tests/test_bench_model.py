"""`ltm bench model`: rows for every variant and context, side-by-side ratios, JSON schema, plot."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from support import GLIBC, run_ltm
import torch

from ltm_core.bench import cpu_peak_tensor_bytes, ratios, train_step_row, variant_config
from ltm_core.config import TitanConfig, TokensMemoryConfig
from ltm_core.resources import malloc_chosen

SMALL = ["model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=1",
         "model.memory.slots=8", "model.segment_length=32"]


def test_variants_share_the_backbone():
    base = TitanConfig(hidden_size=64, num_attention_heads=2, segment_length=32, memory=TokensMemoryConfig(slots=16))
    mem, slots, delta, neural, local, full = (variant_config(base, v, 256) for v in (
        "memory", "slots", "delta", "neural", "segment_local", "full_causal"))
    assert mem.use_memory and slots.use_memory and delta.use_memory and neural.use_memory
    assert not local.use_memory and not full.use_memory
    assert (mem.memory.kind, slots.memory.kind, delta.memory.kind, neural.memory.kind) == ("tokens", "slots", "delta",
                                                                                           "neural")
    assert mem.memory.slots == slots.memory.slots == delta.memory.slots == neural.memory.slots == 16
    assert local.segment_length == 32 and full.segment_length == 256 and full.bptt_segments == 1
    assert {c.hidden_size for c in (mem, slots, delta, neural, local, full)} == {64}
    with pytest.raises(ValueError):
        variant_config(base, "bogus", 256)


def test_ratios_pair_memory_with_full_causal():
    result = {"rows": [
        {"model": "memory", "context": 8, "tokens_per_s": 30.0, "peak_mem_bytes": 10, "step_s": 0.75},
        {"model": "full_causal", "context": 8, "tokens_per_s": 10.0, "peak_mem_bytes": 40, "step_s": 1.8},
        {"model": "segment_local", "context": 8, "tokens_per_s": 50.0, "peak_mem_bytes": 5, "step_s": 0.5}]}
    assert ratios(result) == [{"context": 8, "speedup": 3.0, "memory_ratio": 0.25, "step_vs_segment_local": 1.5}]
    no_full = {"rows": [r for r in result["rows"] if r["model"] != "full_causal"]}  # a ratio without its baseline
    assert ratios(no_full) == [{"context": 8, "speedup": None, "memory_ratio": None, "step_vs_segment_local": 1.5}]
    assert ratios({"rows": result["rows"][:1]}) == []  # no baseline: no row


def test_the_recurrence_share_is_the_time_inside_the_memorys_writes():
    """A step that spends a known part of its time inside the profiler range of the recurrence (and the rest
    outside it) reports that share; a model's memory rows report a share in (0, 1), its baseline rows 0."""
    import time as _time

    from ltm_core.bench import recurrence_share
    from ltm_core.model import RECURRENCE

    def step():
        with torch.profiler.record_function(RECURRENCE):
            _time.sleep(0.06)
        _time.sleep(0.04)

    assert 0.5 < recurrence_share(step, torch.device("cpu")) < 0.7
    cfg = TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, segment_length=16, bptt_segments=2,
                      memory=TokensMemoryConfig(slots=8))
    rows = {v: train_step_row(cfg, v, 128, batch_size=1, device="cpu", dtype="float32", warmup=1, repeats=1)
            for v in ("memory", "segment_local")}
    assert 0 < rows["memory"]["recurrence_share"] < 1 and rows["segment_local"]["recurrence_share"] == 0


def test_cpu_peak_tensor_bytes_is_the_most_held_at_once():
    x = torch.randn(1000, 1000)  # allocated before: not counted

    def step():
        a = x @ x  # 4 MB
        b = torch.randn(2000, 1000)  # 8 MB: 12 held
        del a
        c = b * 2  # 8 MB: 16 held, the peak
        del b, c

    assert 16_000_000 <= cpu_peak_tensor_bytes(step) <= 16_000_000 + 4096


def test_windowed_memory_step_holds_less_than_full_causal():
    """The peak that `ltm bench model` reports: a 1,024-token step of the memory model keeps one 64-token window
    of activations, the full-causal one all 1,024 tokens'."""
    cfg = TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, segment_length=32, bptt_segments=2,
                      memory=TokensMemoryConfig(slots=8))
    rows = {v: train_step_row(cfg, v, 1024, batch_size=1, device="cpu", dtype="float32", warmup=1, repeats=1)
            for v in ("memory", "full_causal")}
    assert all(r["peak_mem_bytes"] > 0 and r["peak_rss_bytes"] >= 0 for r in rows.values()), rows
    assert rows["memory"]["peak_mem_bytes"] < 0.5 * rows["full_causal"]["peak_mem_bytes"], rows


def test_bench_model_cli_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "model.json", tmp_path / "model.png"
    result = run_ltm("bench", "model", "--context", "64", "--repeats", "2", "--gen", "40",
                     "--json", str(out), "--plot", str(png), *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"].startswith("cpu")
    keys = {(r["model"], r["context"]) for r in data["rows"]}
    assert keys == {(m, c) for m in ("memory", "segment_local", "full_causal") for c in (64,)}
    for row in data["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0 and 0 < row["mfu"] < 1
        assert len(row["step_times_s"]) == 2 and row["step_s"] == statistics.median(row["step_times_s"])
        # as `ltm train` on CPU (ltm_core.resources.keep_freed_memory)
        assert row["keeps_freed_memory"] is (GLIBC and not malloc_chosen(os.environ))
    gen = {g["model"]: g for g in data["generation"]}
    assert gen["memory"]["state_bytes"] > 0 and gen["full_causal"]["ms_per_token"] > 0
    assert png.stat().st_size > 10_000 and "memory model / baselines" in result.stdout
    assert "memory recurrence" in result.stdout


def test_bench_kernels_cli_json(tmp_path):
    out = tmp_path / "kernels.json"
    result = run_ltm("bench", "kernels", "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    kernels = {r["kernel"] for r in data["rows"]}
    assert kernels == {"flash_attention", "rms_norm", "swiglu", "memory_update", "compress_gate"}
    impls = {r["impl"] for r in data["rows"] if r["kernel"] == "flash_attention"}
    assert {"torch_ref", "sdpa", "flex"} <= impls
    assert all(r["fwd_ms"] > 0 for r in data["rows"] if r["impl"] in ("torch_ref", "sdpa"))
    assert data["peaks"]["matmul_tflops_bf16"] > 0


def test_bench_model_cli_rejects_a_bad_dtype(tmp_path):
    result = run_ltm("bench", "model", "--dtype", "float8", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "--dtype" in result.stderr and "float8" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_bench_model_cli_runs_only_the_chosen_variants(tmp_path):
    from typer.testing import CliRunner

    from ltm_cli.app import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "model", "--model", "tiny", "--context", "64", "--variant",
                                      "full_causal", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    assert [r["model"] for r in json.loads(out.read_text())["rows"]] == ["full_causal"]
    bad = CliRunner().invoke(app, ["bench", "model", "--variant", "flash", "--json", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "--variant" in bad.output and "flash" in bad.output, bad.output
    assert not (tmp_path / "bad.json").exists()


def test_bench_model_cli_summary_without_full_causal_shows_the_step_ratio(tmp_path):
    """The summary table for the memory model and the segment-local baseline alone: the step ratio, a dash for the
    full-causal ratios (not run), not an empty table."""
    from typer.testing import CliRunner

    from ltm_cli.app import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "model", "--model", "tiny", "--context", "64", "--variant", "memory",
                                      "--variant", "segment_local", "--repeats", "1", "--device", "cpu", "--json",
                                      str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    step = rows["memory"]["step_s"] / rows["segment_local"]["step_s"]
    summary = result.output[result.output.index("memory model / baselines"):]
    assert re.search(rf"64 .* — .* — .* {step:.2f}x", summary), summary


@pytest.mark.parametrize("args, warmup", [([], 1), (["model.compile=true"], 3), (["--warmup", "0"], 0),
                                          (["--warmup", "2", "model.compile=true"], 2)])
def test_bench_model_warms_compiled_models_up_longer(tmp_path, monkeypatch, args, warmup):
    """A compiled row's first step compiles, and CUDA-graph trees run one step eagerly and record on the next:
    model.compile raises the untimed steps to 3 unless --warmup says otherwise."""
    from typer.testing import CliRunner

    import ltm_core.bench as bench
    from ltm_cli.app import app

    seen = []
    fake = {"model": "full_causal", "context": 64, "tokens_per_s": 1.0, "peak_mem_bytes": 1, "step_s": 1.0,
            "recurrence_share": 0.0, "params": 1, "flops_per_token": 1.0, "peak_flops": 1e9}
    monkeypatch.setattr(bench, "rows_interleaved", lambda sets, warmup, repeats: seen.append(warmup) or [dict(fake)])
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "model", "--context", "64", "--variant", "full_causal", "--device",
                                      "cpu", "--json", str(out), *args])
    assert result.exit_code == 0, result.output[-3000:]
    assert seen == [warmup] and json.loads(out.read_text())["warmup_steps"] == warmup


def test_bench_kernels_reports_progress_per_case():
    import torch

    from ltm_extensions.bench import bench_kernels

    calls = []
    rows = bench_kernels("cpu", torch.float32, {"rms_norm": [dict(rows=8, N=16, residual=False)],
                                                "swiglu": [dict(rows=8, N=16)]},
                         peaks={"matmul_tflops_bf16": 1.0, "copy_gbps": 1.0}, warmup=0, repeats=1,
                         progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(0, 2), (1, 2), (2, 2)]
    assert calls[0][2].startswith("rms_norm rows=8") and calls[1][2].startswith("swiglu rows=8") and not calls[2][2]
    assert {r["kernel"] for r in rows} == {"rms_norm", "swiglu"}


def test_cpu_rows_take_their_timed_steps_in_turn(tmp_path, monkeypatch):
    """On CPU each row runs in its own process, and the rows of a context are timed in rounds (one step of each row
    per round, right after an untimed step of the same row), not one row after the other, after a short untimed run
    of each row (so no timed process compiles the CPU passes itself); a row whose process fails reports its error and
    the others go on."""
    import ltm_core.bench as bench

    log = tmp_path / "log"
    monkeypatch.setattr(bench, "CHILD", f"""
import json, sys
args = json.loads(sys.stdin.readline())
say = lambda what: open({str(log)!r}, "a").write(args["variant"] + " " + what + "\\n")
if args["variant"] == "full_causal":
    sys.exit("no memory left")
say("warmup %d context %d" % (args["warmup"], args["context"])); print("ready", flush=True)
for line in sys.stdin:
    say(line.strip())
    print("ok" if line.strip() in ("step", "untimed") else json.dumps({{"model": args["variant"], "context": args["context"]}}),
          flush=True)
""")
    cfg = {"segment_length": 4, "bptt_segments": 2}
    sets = [{"variant": v, "context": 64, "cfg": cfg} for v in ("memory", "segment_local", "full_causal")]
    rows = bench.rows_interleaved(sets, warmup=1, repeats=2)
    assert log.read_text().splitlines() == [
        # first each row's code compiles its CPU passes in a short run of its own (two BPTT windows), untimed
        "memory warmup 1 context 16", "segment_local warmup 1 context 16",
        "memory warmup 1 context 64", "segment_local warmup 1 context 64",
        *["memory untimed", "memory step", "segment_local untimed", "segment_local step"] * 2,
        "memory result", "segment_local result"]
    assert rows[:2] == [{"model": "memory", "context": 64}, {"model": "segment_local", "context": 64}]
    assert rows[2]["model"] == "full_causal" and "no memory left" in rows[2]["error"]


def test_the_overrides_script_times_each_set_in_its_own_process(tmp_path):
    """scripts/bench_overrides.py (an A/B of config options): one row per set of overrides, each built with its
    overrides (here the tokens memory's CPU choice loop compiled and in PyTorch), ratios against the first."""
    out = tmp_path / "ab.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overrides.py"
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--context", "256", "--repeats", "1",
                          "--set", "model.kernels=torch model.memory.slots=16", "--set", "", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["meta"]["command"].startswith("python scripts/bench_overrides.py --model tiny")
    assert [r["overrides"] for r in rows] == ["model.kernels=torch model.memory.slots=16", ""]
    assert all(r["model"] == "memory" and r["context"] == 256 and r["step_s"] > 0 for r in rows)
    assert rows[0]["flops_per_token"] < rows[1]["flops_per_token"]  # 16 kept tokens read, not the preset's 64
    assert "1.000x the first" in run.stdout and run.stdout.count("step ") == 2


def test_the_optimizer_script_times_the_fused_step_against_pytorchs_default(tmp_path):
    """scripts/bench_optimizer.py: the optimizer step of `build_optimizer` (fused) and of PyTorch's default AdamW
    over one preset's parameters, both timed, in its JSON with the command that made it."""
    out = tmp_path / "optim.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_optimizer.py"
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--steps", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["meta"]["command"] == "python scripts/bench_optimizer.py --model tiny --steps 2 --json " + str(out)
    assert set(result["step_ms"]) == {"fused", "default"} and all(v > 0 for v in result["step_ms"].values())
    assert all(len(t) == 2 for t in result["step_times_ms"].values())
    assert "ms fused" in run.stdout


def test_the_overrides_script_runs_a_row_per_span(tmp_path):
    """scripts/bench_overrides.py --span: each set runs once per number of tokens per backward call (here the
    segment-local baseline, one call by default, in passes of 128 tokens, which hold less at their peak); a span that
    is not positive: one line, exit code 2."""
    out = tmp_path / "spans.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overrides.py"
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--context", "512", "--repeats", "1",
                          "--variant", "segment_local", "--span", "512", "--span", "128", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["span"]) for r in rows] == [("segment_local", 512), ("segment_local", 128)]
    assert 0 < rows[1]["peak_mem_bytes"] < rows[0]["peak_mem_bytes"]
    assert "in spans of 128" in run.stdout
    bad = subprocess.run([sys.executable, str(script), "--context", "256", "--span", "0"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "--span must be a positive number of tokens, got 0"


def test_the_overrides_script_compares_the_code_of_another_commit(tmp_path):
    """scripts/bench_overrides.py --base REV (an A/B of a change): each set runs on REV's code, checked out into a
    temporary git worktree that its row's process imports (the prelude checks where `ltm_core` came from), and on the
    working tree's, with the paired ratios against the first row; the worktree is gone afterwards. A REV that is no
    commit: one line, exit code 2."""
    repo = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    script = repo / "scripts" / "bench_overrides.py"
    out = tmp_path / "ab.json"
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--context", "256", "--repeats", "2",
                          "--base", "HEAD", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["code"], r["overrides"]) for r in rows] == [("HEAD", ""), ("working tree", "")]
    assert all(r["step_s"] > 0 and len(r["step_times_s"]) == 2 for r in rows)
    assert rows[0]["paired_ratio"]["mean"] == 1.0 and rows[1]["paired_ratio"]["mean"] > 0
    assert "on HEAD" in run.stdout and "on working tree" in run.stdout and "paired" in run.stdout
    assert subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout == worktrees
    bad = subprocess.run([sys.executable, str(script), "--context", "256", "--base", "no-such-commit"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("--base no-such-commit: not a commit")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_the_step_costs_script_splits_both_steps(tmp_path):
    """scripts/step_costs.py: the memory and segment-local steps timed in turn, each split into its backward and the
    forward's parts; the memory's own parts (scan, prefix, kept keys and values) appear only in the memory row, and
    every part's time stays inside its step and the functions that call it. Each row's operator counts cover its
    three phases, and the memory's forward and backward dispatch more operators than the segment-local ones. The
    thread-scaling split is Amdahl's: serial + parallel = the 1-thread step, and the N-thread step = serial +
    parallel / N."""
    out = tmp_path / "costs.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "step_costs.py"
    run = subprocess.run([sys.executable, str(script), "--model", "tiny", "--context", "512", "--steps", "2",
                          "--set", "model.memory.slots=16", "--scaling-threads", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["meta"]["command"].startswith("python scripts/step_costs.py --model tiny")
    assert result["threads"]["n"] == 2 and set(result["threads"]["rows"]) == {"memory", "segment_local"}
    for t in result["threads"]["rows"].values():
        assert t["step_1_ms"] > 0 and t["step_n_ms"] > 0
        assert t["serial_ms"] + t["parallel_ms"] == pytest.approx(t["step_1_ms"])
        assert t["serial_ms"] + t["parallel_ms"] / 2 == pytest.approx(t["step_n_ms"])
    assert "thread scaling" in run.stdout
    memory, local = result["rows"]
    assert (memory["model"], local["model"]) == ("memory", "segment_local")
    for row in (memory, local):
        parts = row["forward_parts_ms"]
        assert len(row["step_times_ms"]) == 2 and 0 < row["backward_ms"] < max(row["step_times_ms"]) * 2
        assert 0 < parts["blocks"] <= parts["forward"] < 2 * row["step_ms"]
        assert 0 < parts["ffn"] and 0 < parts["norms"] and 0 < parts["short_conv"]
    mp, lp = memory["forward_parts_ms"], local["forward_parts_ms"]
    assert 0 < lp["attention"] <= lp["attend"] <= lp["blocks"]
    assert 0 < mp["kept_read"] <= mp["read_kept"] <= mp["blocks"]  # the window read in one node (CPU float32)
    assert mp["memory_scan"] > 0 and mp["memory_prefix"] > 0
    assert lp["memory_scan"] == lp["memory_prefix"] == lp["read_kept"] == 0 < lp["qkv_projection"]
    assert "forward: memory_scan" in run.stdout and "backward" in run.stdout
    counts = {row["model"]: row["operators"] for row in (memory, local)}
    for phases in counts.values():
        assert set(phases) == {"forward", "backward", "optimizer"}
        assert all(phases[p]["operators"] > 0 for p in phases) and phases["optimizer"]["views"] == 0
    for phase in ("forward", "backward"):
        assert counts["memory"][phase]["operators"] > counts["segment_local"][phase]["operators"]
    assert "operators per step" in run.stdout


def _serial_time_module():
    """scripts/serial_time.py imported as a module (its parser and pairing are functions of perf's text)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "serial_time.py"
    spec = importlib.util.spec_from_file_location("serial_time", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serial_time_counts_the_main_threads_samples_while_the_others_are_idle():
    """scripts/serial_time.py's reading of `perf script`: a main-thread sample is serial when every other thread's
    nearest sample (within the window) is in libgomp, or when a thread has none that near (off the CPU); it is counted
    under the kind of function it fell in. Lines of another form are skipped."""
    st = _serial_time_module()
    text = "\n".join([
        "  100  10.000000:  7f01 mkl_blas_avx512_sgemm_kernel_0 (/lib/libtorch_cpu.so)",
        "  101  10.000100:  7f02 [unknown] (/lib/libgomp.so.1)",  # idle: the GEMM's end on the main thread is serial
        "  100  10.000500:  7f03 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "  101  10.000550:  7f04 mkl_blas_avx512_sgemm_kernel_0 (/lib/libtorch_cpu.so)",  # working: not serial
        "  100  10.001200:  7f05 [unknown] (/tmp/perf-100.map)",  # no sample of 101 within 0.5 ms: off the CPU
        "  101  10.002000:  7f06 [unknown] (/lib/libgomp.so.1)",
        "  100  10.002000:  7f07 at::native::AVX2::VectorizedLoop2d<add_kernel> (/lib/libtorch_cpu.so)",
        "  100  10.002400:  7f08 THPVariable_Wrap (/lib/libtorch_python.so)",
        "this line is not a sample",
    ])
    samples = st.parse_samples(text)
    assert len(samples) == 8 and samples[0] == (100, 10.0, "mkl_blas_avx512_sgemm_kernel_0", "libtorch_cpu.so")
    split = st.serial_split(samples, main=100, window=0.0005)
    assert split["samples"] == 5 and split["serial"] == 4
    assert split["kinds"] == {"gemm": 1, "python": 0, "compiled_passes": 1, "elementwise": 1, "openmp": 0, "rest": 1}
    assert split["functions"]["THPVariable_Wrap (libtorch_python.so)"] == 1 and sum(split["functions"].values()) == 4
    assert st.serial_split([s for s in samples if s[0] == 100], main=100, window=0.0005)["serial"] == 5  # alone


def test_serial_time_without_perf_says_so_in_one_line(tmp_path):
    """Without `perf` on PATH the script stops with one line naming what it needs, exit code 2."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "serial_time.py"
    run = subprocess.run([sys.executable, str(script), "--context", "512"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PATH": str(tmp_path)})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "perf" in run.stderr


def _perf_can_record() -> bool:
    """Linux perf on PATH, allowed to record a process of this user (root, or perf_event_paranoid at most 2)."""
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    level = int(paranoid.read_text()) if paranoid.exists() else 3
    return shutil.which("perf") is not None and (os.geteuid() == 0 or level <= 2)


@pytest.mark.skipif(not _perf_can_record(), reason="needs Linux perf, allowed to record")
def test_serial_time_records_both_rows(tmp_path):
    """With perf: both rows sampled, each main-thread sample counted once, the serial ones split by kind, the
    command recorded."""
    out = tmp_path / "serial.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "serial_time.py"
    run = subprocess.run([sys.executable, str(script), "--context", "512", "--seconds", "1", "--set",
                          "model.memory.slots=16", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["rows"]] == ["memory", "segment_local"]
    for row in result["rows"]:
        assert row["steps"] > 0 and row["samples"] > 0 and 0 <= row["serial"] <= row["samples"]
        assert sum(row["kinds"].values()) == row["serial"] >= sum(row["functions"].values())
    assert result["meta"]["command"].startswith("python scripts/serial_time.py --context 512")
    assert "serial (other threads idle)" in run.stdout


def test_bench_model_mfu_divides_every_row_by_the_runs_peak(tmp_path, monkeypatch):
    """Each CPU row times its own small matmul, which varies several-fold on a shared machine: every row's MFU
    divides by the highest peak of the run (kept as the result's peak_flops), so MFUs compare across rows. The
    table's title names the model overrides the run used."""
    from typer.testing import CliRunner

    import ltm_core.bench as bench
    from ltm_cli.app import app

    def rows(sets, warmup, repeats):
        return [{"model": s["variant"], "context": s["context"], "tokens_per_s": 100.0, "peak_mem_bytes": 1,
                 "step_s": 1.0, "recurrence_share": 0.0, "params": 1, "flops_per_token": 1e6,
                 "peak_flops": {64: 1e9, 128: 4e9}[s["context"]] / (1 + i)} for i, s in enumerate(sets)]

    monkeypatch.setattr(bench, "rows_interleaved", rows)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "model", "--context", "64", "--context", "128", "--variant",
                                      "segment_local", "--variant", "full_causal", "--device", "cpu", "--json",
                                      str(out), "model.memory.slots=32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    data = json.loads(out.read_text())
    assert data["peak_flops"] == 4e9
    assert [r["mfu"] for r in data["rows"]] == [pytest.approx(1e8 / 4e9)] * 4
    assert "model=tiny model.memory.slots=32" in " ".join(result.output.split())  # (a narrow console wraps it)
