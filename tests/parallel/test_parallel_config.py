"""Parallel presets and the one-line config errors raised before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltm_core.configuration import compose
from ltm_core.errors import ConfigError
from ltm_core.parallel.layout import planned_world_size, resolve_layout, uses_native
from ltm_core.parallel.pipeline import split_layers, stage_ids

PRESETS = ["single", "ddp", "fsdp", "tp2", "tp4", "pp2", "pp4", "tp2_pp2", "tp4_pp2", "fsdp2_tp2"]
GRID = ["model.hidden_size=128", "model.num_attention_heads=8", "model.num_hidden_layers=4",
        "trainer.accelerator=cpu"]


@pytest.mark.parametrize("preset,world,layout", [
    ("single", 1, (1, 1, 1)), ("ddp", 2, (2, 1, 1)), ("fsdp", 2, (2, 1, 1)), ("tp2", 2, (1, 2, 1)),
    ("tp4", 4, (1, 4, 1)), ("pp2", 2, (1, 1, 2)), ("pp4", 4, (1, 1, 4)), ("tp2_pp2", 4, (1, 2, 2)),
    ("tp4_pp2", 8, (1, 4, 2)), ("fsdp2_tp2", 4, (2, 2, 1))])
def test_presets_compose(preset, world, layout):
    cfg = compose([f"parallel={preset}", *GRID])
    assert planned_world_size(cfg) == world
    lay = resolve_layout(cfg)
    assert (lay.dp, lay.tp, lay.pp) == layout
    assert uses_native(cfg) == (preset not in ("single", "ddp"))


def test_every_preset_key_is_commented():
    folder = Path(__file__).resolve().parents[2] / "conf" / "parallel"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(PRESETS)
    for path in folder.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#") and not line.startswith("name:"):
                assert "#" in line, f"{path.name}: {line}"


def test_dp_rest_and_layout_decides_processes():
    cfg = compose(["parallel=fsdp", "parallel.dp=3", *GRID])
    assert planned_world_size(cfg) == 3  # on CPU the layout decides how many processes start
    cfg = compose(["parallel=tp2", "parallel.dp=-1", "parallel.devices=8", *GRID])
    assert (resolve_layout(cfg).dp, planned_world_size(cfg)) == (4, 8)
    assert resolve_layout(compose(["parallel=tp2_pp2", "parallel.dp=-1", *GRID]), world=16).dp == 4


@pytest.mark.parametrize("overrides,key,fragment", [
    (["parallel=ddp", "parallel.dp=3"], "parallel.dp", "must equal the world size 2"),
    (["parallel=tp2", "parallel.devices=3"], "parallel.dp", "must equal the world size 3"),
    (["parallel=tp2", "parallel.dp=-1", "parallel.devices=3"], "parallel.tp", "does not divide the world size 3"),
    (["parallel=tp4", "model.num_attention_heads=2", "model.hidden_size=64"], "parallel.tp",
     "model.num_attention_heads=2 is not divisible by parallel.tp=4"),
    (["parallel=tp2", "model.num_attention_heads=4", "model/memory=slots", "model.memory.heads=1"], "parallel.tp",
     "model.memory.heads=1 is not divisible"),
    (["parallel=pp4", "model.num_hidden_layers=2"], "parallel.pp", "model.num_hidden_layers=2 is fewer than the 4"),
    (["parallel=pp2", "parallel.schedule=interleaved", "model.num_hidden_layers=3"], "parallel.pp",
     "fewer than the 4 pipeline stages"),
    (["parallel=pp2", "parallel.microbatches=3"], "parallel.microbatches", "does not divide data.batch_size=8"),
    (["parallel=pp4", "model.num_hidden_layers=4", "parallel.microbatches=2"], "parallel.microbatches",
     "at least as many microbatches as stages (4)"),
    (["parallel=pp2", "parallel.schedule=zigzag"], "parallel.schedule", "must be one of gpipe, 1f1b, interleaved"),
    (["parallel=fsdp", "parallel.dp=0"], "parallel.dp", "positive integer or -1"),
    (["parallel=single", "parallel.strategy=deepspeed"], "parallel.strategy", "must be one of auto, ddp, native"),
    (["parallel=pp2", "data.seq_len=192", "model.segment_length=64", "model.bptt_segments=2"], "data.seq_len",
     "multiple of model.segment_length × model.bptt_segments = 128"),
    (["parallel=tp2", "model.intermediate_size=341"], "parallel.tp",
     "model.intermediate_size=341 is not divisible by parallel.tp=2"),
    (["parallel=tp2", "data=passkey"], "data.name", "data=passkey (a generated task) is not supported"),
])
def test_config_errors_are_one_line(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        compose(overrides + ["trainer.accelerator=cpu"])
    message = str(err.value)
    assert err.value.key == key, message
    assert fragment in message and "\n" not in message
    assert message.startswith(f"config error: {key}: ")


def test_cli_rejects_a_bad_layout_before_starting(tmp_path):
    from support import run_ltm

    result = run_ltm("train", "parallel=tp2_pp2", "parallel.dp=2", "parallel.devices=2", f"output_dir={tmp_path}/x",
                     "trainer.accelerator=cpu")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "config error: parallel.dp: dp × tp × pp = 2 × 2 × 2 = 8" in lines[0], result.stderr
    assert not (tmp_path / "x").exists()


def test_split_layers_and_stage_placement():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_ids(1, 2, 2) == [1, 3]  # interleaved: loop-style placement


@pytest.mark.parametrize("preset, kind", [("tp2", "slots"), ("tp2", "tokens"), ("tp2", "delta"), ("tp2", "neural"),
                                         ("ddp", "tokens"), ("fsdp", "tokens"), ("fsdp", None)])
def test_bench_parallel_measures_the_analytic_volume(tmp_path, preset, kind):
    """`ltm bench parallel` library function: the collectives counted in a training step add up to the analytic
    formula, exactly. tp2: TP all-reduces and all-gathers; only the slots memory has write projections to shard (the
    neural memory, mac: its retrieved tokens' gradient through the attention's projection). ddp / fsdp: one gradient
    all-reduce, or one parameter all-gather, per backward, and training makes one backward per pass of
    `windows_per_pass` BPTT windows (here 4 windows in passes of 3 and 1), or one for the whole sequence without a
    memory (kind None)."""
    from ltm_core.parallel.bench import bench_parallel, rows_table

    calls = []
    overrides = ["model.num_hidden_layers=1", "model.hidden_size=32", "data.seq_len=64"]
    if kind is None:
        overrides.append("model.use_memory=false")
    else:
        overrides += [f"model/memory={kind}", "model.memory.select_noise=0" if kind == "tokens" else
                      "model.memory.slots=16"]
    if preset != "tp2":  # several windows per pass, and a last pass with fewer
        overrides += ["model.segment_length=8", "model.bptt_segments=2", "model.windows_per_pass=3"]
    rows = bench_parallel([preset], overrides, progress=lambda *a: calls.append(a))
    assert calls == [(0, 1, f"{preset} (2 processes)"), (1, 1, "")]  # `ltm bench parallel` draws its bar from these
    (row,) = rows
    assert row["world"] == 2 and row["measured_bytes"] > 0
    assert abs(row["ratio"] - 1.0) < 1e-6, row
    expected = {"ddp": {"all_reduce"}, "fsdp": {"all_gather", "reduce_scatter"}}.get(preset, {"all_reduce"})
    if kind == "slots":
        expected.add("all_gather")  # the write attention's gathered outputs
    assert set(row["measured_by_kind"]) >= expected
    assert rows_table(rows).row_count == 1


@pytest.mark.parametrize("saved, tp", [(2, 1), (1, 2)])
def test_a_distributed_checkpoint_of_the_other_tp_kind_is_one_line(tmp_path, saved, tp):
    """tp > 1 stores the fused projections in another shape: a resume across tp = 1 and tp > 1 is refused in one
    line naming the way on (torch's own error was a traceback per rank), before any collective."""
    import json

    import torch

    from ltm_core.errors import CheckpointError
    from ltm_core.parallel import checkpoint as pckpt

    step = tmp_path / "checkpoints" / "dcp" / "step-00000002"
    step.mkdir(parents=True)
    (step / "train_state.json").write_text(json.dumps({"step": 2, "layout": {"dp": 1, "tp": saved, "pp": 1}}))
    kind = "> 1" if saved > 1 else "= 1"
    with pytest.raises(CheckpointError, match=rf"saved with tp={saved} and resumes on layouts with tp {kind} only, "
                                              rf"not tp={tp}.*resume=.*last\.ckpt"):
        pckpt.load(step, [], [], torch.device("cpu"), tp)
