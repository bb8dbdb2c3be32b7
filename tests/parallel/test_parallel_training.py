"""Distributed training equals single-process training (fp32, gloo on CPU, up to 4 processes).

The single-process reference is the Lightning run with the same global batch (4 samples); every parallel run
starts from the same seeded weights, reads the same samples and must follow it step by step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from parallel_workers import read_losses, read_weights

TOL = 1e-5
STEPS = 5


def assert_same_run(reference: Path, run: Path, steps: int = STEPS) -> None:
    expected, got = read_losses(reference), read_losses(run)
    assert len(expected) == steps and len(got) == steps, (expected, got)
    for step, (a, b) in enumerate(zip(expected, got), 1):
        assert math.isclose(a, b, abs_tol=TOL), f"step {step}: single {a} vs parallel {b}"
    ref_w, par_w = read_weights(reference), read_weights(run)
    assert set(ref_w) == set(par_w)
    for name, w in ref_w.items():
        assert par_w[name].shape == w.shape, name
        assert torch.allclose(par_w[name].float(), w.float(), atol=TOL, rtol=0), \
            f"{name}: max diff {(par_w[name].float() - w.float()).abs().max():.2e}"


@pytest.mark.parametrize("preset, reference", [("fsdp", "single"), ("tp2", "single"), ("tp2_pp2", "single"),
                                               ("tp2_delta", "single_delta"), ("tp2_slots", "single_slots"),
                                               ("pp2_slots", "single_slots")])
def test_matches_single_process(runs, preset, reference):
    assert_same_run(runs[reference], runs[preset])


def test_output_layout(runs):
    out = runs["tp2_pp2"]
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "checkpoints/dcp/latest"):
        assert (out / name).exists(), name
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert ckpt["hyper_parameters"]["config"]["parallel"]["name"] == "tp2_pp2"
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "val/loss" in header


def test_resume_tp2_pp2_continues_exactly(runs):
    """3 steps, a distributed checkpoint, then resume=auto for steps 4-5: the same losses and weights as 5
    uninterrupted steps."""
    full, resumed = read_losses(runs["tp2_pp2"]), read_losses(runs["resume"])
    assert len(resumed) == STEPS
    for a, b in zip(full, resumed):
        assert math.isclose(a, b, abs_tol=1e-6), (full, resumed)
    w_full, w_res = read_weights(runs["tp2_pp2"]), read_weights(runs["resume"])
    for name, w in w_full.items():
        assert torch.allclose(w_res[name], w, atol=1e-6, rtol=0), name


def test_consolidated_checkpoint_generates_like_single_process(runs):
    """`ltm generate` / `ltm eval` path: load_model on the consolidated tp2_pp2 checkpoint generates the tokens the
    single-process model generates from the same (reference) weights."""
    from ltm_core.checkpoint import load_model
    from ltm_core.inference import InferenceConfig, InferenceEngine
    from ltm_core.tokenizer import ByteTokenizer

    prompt = torch.tensor([ByteTokenizer().encode("the lord said unto", bos=True)])
    tokens = {}
    for name in ("single", "tp2_pp2"):
        model = load_model(runs[name] / "checkpoints" / "last.ckpt")
        engine = InferenceEngine(model, InferenceConfig(temperature=0.0, stop_at_eos=False))
        tokens[name] = [int(t[0]) for t in engine.stream(prompt, 40)]
    assert tokens["tp2_pp2"] == tokens["single"]
    # the same weights in one process give the same logits as well
    a = load_model(runs["single"] / "checkpoints" / "last.ckpt")
    b = load_model(runs["tp2_pp2"] / "checkpoints" / "last.ckpt")
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-4)


def test_pp2_through_the_launcher(tmp_path, tokens, runs):
    """`train(cfg)` on one machine starts the layout's processes itself (torch elastic launcher) and dispatches the
    native preset to fit_parallel."""
    from ltm_core.configuration import compose
    from ltm_core.train import train

    out = tmp_path / "pp2"
    last = train(compose(tokens + ["parallel=pp2", "parallel.microbatches=2", f"output_dir={out}"]))
    assert last == out / "checkpoints" / "last.ckpt" and last.is_file()
    assert_same_run(runs["single"], out)


def test_ddp_matches_single_process(tmp_path, tokens, runs):
    """Lightning DDP over 2 processes (2 samples each): the same weights and the same logged loss (the mean over
    ranks) as the single-process run."""
    from ltm_core.configuration import compose
    from ltm_core.train import train

    out = tmp_path / "ddp"
    train(compose(tokens + ["parallel=ddp", "data.batch_size=2", f"output_dir={out}"]))
    ref_w, ddp_w = read_weights(runs["single"]), read_weights(out)
    for name, w in ref_w.items():
        assert torch.allclose(ddp_w[name], w, atol=TOL, rtol=0), name
    want, got = read_losses(runs["single"]), read_losses(out)
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(want, got), 1):
        assert math.isclose(a, b, abs_tol=TOL), f"step {step}: {a} vs {b}"


def test_tp_ranks_draw_the_same_select_noise():
    """With the select write's Gumbel noise on (`select_noise=0.5`, training), the memory bank and the replicated
    parameters stay identical on the tp ranks: each rank draws the noise itself, from the common seed."""
    import torch.multiprocessing as mp
    from parallel_workers import free_port, tp_memory_banks_agree

    cfg = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, segment_length=16, bptt_segments=3,
               short_conv=3, short_conv_carry=True, kernels="torch",
               memory=dict(kind="tokens", slots=8, select_noise=0.5, read_importance=True))
    mp.start_processes(tp_memory_banks_agree, args=(2, free_port(), cfg, 3), nprocs=2, start_method="spawn")


def test_native_runs_log_the_memory_aux_loss(runs):
    """The tokens memory's importance penalty (`train/aux_loss`) in a native run's metrics.csv, as the Lightning run
    logs it, step for step (with pipeline stages each stage applies its own: not logged)."""
    def aux(out: Path) -> list[float]:
        rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
        return [float(r["train/aux_loss"]) for r in rows if r.get("train/aux_loss")]

    single, native = aux(runs["single"]), aux(runs["tp2"])
    assert native and len(native) == len(single)
    for a, b in zip(single, native):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (single, native)
