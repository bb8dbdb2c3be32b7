"""The task config group, data=<task> composition, the task data module, and eval's task config."""

from __future__ import annotations

import dataclasses

import itertools
from pathlib import Path

import pytest
import torch

from ltm_core.config import DataConfig, TaskConfig, TokensMemoryConfig
from ltm_core.configuration import compose, model_config
from ltm_core.model import TitanModel
from ltm_core.errors import ConfigError
from ltm_core.tasks.datamodule import TaskDataModule, TaskSamples, ValidationSamples, task_config
from ltm_core.tasks.evaluate import default_lengths, eval_task_config


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
def test_data_task_selects_the_task(name):
    cfg = compose([f"data={name}"])
    assert cfg.data.name == name and cfg.task.name == name
    assert task_config(cfg) == TaskConfig(**{**dict(cfg.task)})
    assert compose([]).task.name is None and task_config(compose([])) is None


@pytest.mark.parametrize("overrides, key", [
    (["data=passkey", "task=mqar"], "task"),
    (["data=mqar", "data.seq_len=256"], "data.seq_len"),
    (["data=passkey", "data.seq_len=64", "model.segment_length=32"], "data.seq_len"),
    (["task=passkey", "task.filler=news"], "task.filler"),
    (["task=passkey", "task.digits=0"], "task.digits"),
    (["task=passkey", "task.filler_start=middle"], "task.filler_start"),
    (["task=mqar", "task.pairs=[]"], "task.pairs"),
    (["task=mqar", "task.key_length=3"], "task.key_length"),
    (["task=mqar", "task.key_length=1", "task.train_pairs=37"], "task.train_pairs"),
    (["task=passkey", "task.lengths=[0]"], "task.lengths"),
    (["task=babi_facts", "task.names=7"], "task.names"),
    (["task=babi_facts", "task.train_facts=0"], "task.train_facts"),
    (["task=nope"], "task"),
    (["task=mqar", "task.layout_segment=0"], "task.layout_segment"),
    (["data=mqar", "data.seq_len=192", "model.segment_length=192"], "data.seq_len"),  # 192-token gap: too long
])
def test_task_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert err.value.key == key


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
@pytest.mark.parametrize("baseline", ["", "_baseline"])
def test_experiments_compose(name, baseline):
    cfg = compose([f"experiment={name}{baseline}"])
    assert cfg.data.name == cfg.task.name == name
    assert cfg.model.use_memory is (baseline == "")


@pytest.mark.parametrize("name", ["passkey", "passkey_long", "mqar", "mqar_long", "babi_facts"])
def test_experiment_baselines_match_the_parameter_count(name):
    memory, baseline = (TitanModel(model_config(compose([f"experiment={name}{suffix}"]))).num_parameters()
                        for suffix in ("", "_baseline"))
    assert abs(baseline - memory) / memory < 0.02, (memory, baseline)


@pytest.mark.parametrize("name,more", [("passkey", 3000), ("mqar", 1000)])
@pytest.mark.parametrize("baseline", ["", "_baseline"])
def test_the_long_stage_continues_its_stage_one_on_longer_samples(name, more, baseline):
    """experiment=NAME_long[_baseline] resumes experiment=NAME[_baseline]: the same model but for a BPTT window
    over the whole 192-token sample, the same task, `more` steps."""
    first, long = compose([f"experiment={name}{baseline}"]), compose([f"experiment={name}_long{baseline}"])
    a, b = model_config(first), model_config(long)
    changed = {"bptt_segments", "memory"} if name == "passkey" else {"bptt_segments"}  # (the baseline: unused)
    assert {k for k, v in vars(a).items() if getattr(b, k) != v} == changed
    assert dataclasses.replace(b.memory, select_dedup=a.memory.select_dedup) == a.memory  # + suppression
    assert long.data.seq_len == 2 * first.data.seq_len == b.bptt_segments * b.segment_length == 192
    assert long.trainer.max_steps == first.trainer.max_steps + more
    assert long.task == first.task and long.optim == first.optim
    if name.startswith("passkey"):
        assert first.task.filler == "ruler" and first.task.filler_start == "random"  # every phase of the filler
    if name == "passkey":  # a key split by a segment boundary keeps its predecessors
        assert a.memory.kind == "tokens" and a.short_conv and a.short_conv_carry
        if not baseline:  # stage 2 trains with near-duplicate suppression
            assert a.memory.select_dedup is None and b.memory.select_dedup == 0.97


FULL = ["experiment=mqar_long_baseline", "model.segment_length=192", "model.bptt_segments=1", "task.layout_segment=32"]


def test_layout_segment_gives_a_full_causal_model_the_memory_models_samples(monkeypatch):
    """task.layout_segment=32 on a full-causal model (one 192-token segment, no memory): the samples (training,
    validation and evaluation) laid out for the memory model's 32-token segments, token for token what
    experiment=mqar_long reads."""
    from ltm_core import TitanConfig
    from ltm_core.tasks.evaluate import evaluate_task

    full, memory = compose(FULL), compose(["experiment=mqar_long"])
    assert full.model.segment_length == full.data.seq_len == 192 and not full.model.use_memory
    assert full.task.layout_segment == 32 == memory.model.segment_length
    modules = [TaskDataModule(DataConfig(**dict(c.data)), task_config(c), int(c.model.segment_length))
               for c in (full, memory)]
    for stream in ("train_dataloader", "val_dataloader"):
        (x, y), (x2, y2) = (next(iter(getattr(m, stream)())) for m in modules)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    plain = TaskDataModule(DataConfig(**dict(full.data)), task_config(compose(["experiment=mqar_long_baseline"])), 192)
    with pytest.raises(ValueError, match="needs at least"):  # without it the 192-token gap does not fit
        next(iter(plain.train_dataloader()))
    import ltm_core.tasks.mqar as mqar

    real, layouts = mqar.make_mqar, []

    def make_mqar(rng, length, pairs, segment_length, *args):
        layouts.append(segment_length)
        return real(rng, length, pairs, segment_length, *args)
    monkeypatch.setattr(mqar, "make_mqar", make_mqar)
    task_cfg = TaskConfig(**{**dict(full.task), "lengths": [192], "samples": 1, "pairs": [4]})
    model = TitanModel(TitanConfig(hidden_size=32, num_attention_heads=2, use_memory=False, segment_length=192))
    result = evaluate_task(model, task_cfg, train_length=192)
    assert layouts == [32] and result["segment_length"] == 192
    assert result["sample_settings"]["layout_segment"] == 32


def test_task_samples_resume_exactly_and_split_over_ranks():
    cfg = TaskConfig(name="passkey")
    full = list(itertools.islice(TaskSamples(cfg, 128, 32, seed=5), 6))
    resumed = list(itertools.islice(TaskSamples(cfg, 128, 32, seed=5, start=4), 2))
    for (x, y), (x2, y2) in zip(full[4:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    ranks = [list(itertools.islice(TaskSamples(cfg, 128, 32, seed=5, rank=r, world=2), 3)) for r in (0, 1)]
    interleaved = [ranks[i % 2][i // 2] for i in range(6)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, interleaved))
    x, y = full[0]
    assert x.shape == y.shape == (128,) and (y != -100).sum() == cfg.digits
    val = ValidationSamples(TaskSamples(cfg, 128, 32, seed=5), 3)
    assert len(val) == 3 and torch.equal(val[1][0], val[1][0]) and not torch.equal(val[0][0], full[0][0])


def test_lm_loss_trains_on_the_filler_and_validates_on_the_answer():
    """task.lm_loss=true adds the next-byte loss on every token to training; validation stays the answer loss, so
    validation losses of runs with and without it compare."""
    cfg = TaskConfig(name="passkey", lm_loss=True)
    x, y = TaskSamples(cfg, 128, 32, seed=5).sample(0)
    assert (y != -100).all()
    _, y_val = ValidationSamples(TaskSamples(cfg, 128, 32, seed=5), 2)[0]
    _, y_plain = ValidationSamples(TaskSamples(TaskConfig(name="passkey"), 128, 32, seed=5), 2)[0]
    assert torch.equal(y_val, y_plain) and (y_val != -100).sum() == cfg.digits


def test_task_datamodule_batches():
    module = TaskDataModule(DataConfig(name="mqar", seq_len=512, batch_size=4, val_samples=6),
                            TaskConfig(name="mqar", train_pairs=8), segment_length=64)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (4, 512) and y.shape == (4, 512)
    assert sum(len(b[0]) for b in module.val_dataloader()) == 6


def test_eval_task_config_defaults_to_the_trained_task():
    stored = compose(["data=babi_facts", "task.facts=3", "data.seq_len=256"])
    stored = {k: dict(v) if hasattr(v, "items") else v for k, v in stored.items()}
    cfg = eval_task_config(stored, [])
    assert cfg.name == "babi_facts" and cfg.facts == 3  # the checkpoint's sample settings
    assert eval_task_config(stored, ["task.facts=5", "task.samples=7"]).facts == 5
    other = eval_task_config(stored, ["task=passkey", "task.lengths=[100,200]"])
    assert other.name == "passkey" and other.lengths == [100, 200]
    kjv = {**stored, "data": {**stored["data"], "name": "kjv"}, "task": {"name": None}}
    with pytest.raises(ConfigError, match="task=passkey"):
        eval_task_config(kjv, [])
    assert default_lengths(256) == [256, 1024, 4096, 16384]
    # a run trained on a random filler start is evaluated on RULER's text as is, unless asked
    trained = compose(["data=passkey", "task.filler=ruler", "task.filler_start=random", "data.seq_len=96",
                       "model.segment_length=32"])
    trained = {k: dict(v) if hasattr(v, "items") else v for k, v in trained.items()}
    assert eval_task_config(trained, []).filler_start == "first"
    assert eval_task_config(trained, []).filler == "ruler"
    assert eval_task_config(trained, ["task.filler_start=random"]).filler_start == "random"
    # the evaluation grid a recipe sets (experiment=mqar's pair counts) is the default too
    mqar = compose(["experiment=mqar"])
    mqar = {k: dict(v) if hasattr(v, "items") else v for k, v in mqar.items()}
    assert eval_task_config(mqar, []).pairs == [2, 4, 8, 16, 32]
    assert eval_task_config(mqar, ["task.pairs=[3]"]).pairs == [3]


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
def test_evaluation_at_the_training_length_reads_what_training_reads(name, monkeypatch):
    """A cell of length L is scored on samples of L + 1 tokens, so at 1x the model reads data.seq_len tokens and
    the sample ends where a training sample ends (a model trained with the answer at a fixed place relative to
    the segment boundaries is evaluated there too)."""
    from ltm_core import TitanConfig
    from ltm_core.tasks import get_task
    from ltm_core.tasks.evaluate import evaluate_task

    task, seen = get_task(name), []
    monkeypatch.setattr(type(task), "score", lambda self, model, samples: (
        seen.extend(samples), {"exact_match": [0.0] * len(samples)})[1])
    cfg = TaskConfig(name=name, lengths=[256], samples=2, batch_size=2, pairs=[4], depth_bins=2, train_pairs=4)
    model = TitanModel(TitanConfig(hidden_size=32, num_attention_heads=2, segment_length=32,
                                   memory=TokensMemoryConfig(slots=4)))
    evaluate_task(model, cfg, train_length=256)
    x, y = TaskSamples(cfg, 256, 32, seed=0).sample(0)
    assert seen and all(len(s.tokens) == len(x) + 1 == 257 for s in seen)
    from ltm_core.tasks.common import sample_rng
    trained = task.train_sample(sample_rng(0, 0, 0), 257, cfg, 32)  # what TaskSamples makes for seq_len 256
    assert all(s.targets[-1][0] == trained.targets[-1][0] for s in seen)  # the last scored span starts as there


LM_RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("lm_*.yaml")
                    if not p.stem.endswith(("_baseline", "_full")))


def test_each_corpus_has_its_long_document_recipe():
    assert LM_RECIPES == ["lm_kjv", "lm_pystdlib"]


@pytest.mark.parametrize("name", LM_RECIPES)
def test_lm_recipes_and_their_baselines_are_matched(name):
    """experiment=lm_X (memory), lm_X_baseline (segment-local) and lm_X_full (full causal: one segment over the
    whole sample): parameter counts within 2 %, the same data, steps, optimiser and seeds; a context of at least 16
    of the memory model's segments."""
    cfgs = {suffix: compose([f"experiment={name}{suffix}"]) for suffix in ("", "_baseline", "_full")}
    models = {suffix: model_config(cfg) for suffix, cfg in cfgs.items()}
    with torch.device("meta"):
        params = {suffix: TitanModel(m).num_parameters() for suffix, m in models.items()}
    memory, baseline, full = models[""], models["_baseline"], models["_full"]
    for suffix in ("_baseline", "_full"):
        assert abs(params[suffix] - params[""]) / params[""] < 0.02, params
        for group in ("data", "trainer", "optim"):
            assert cfgs[suffix][group] == cfgs[""][group], group
        assert cfgs[suffix].seed == cfgs[""].seed
    L = cfgs[""].data.seq_len
    assert memory.use_memory and L >= 16 * memory.segment_length
    assert not baseline.use_memory and baseline.segment_length == memory.segment_length
    assert not full.use_memory and full.segment_length == L and full.bptt_segments == 1
    same = {"hidden_size", "num_attention_heads", "num_hidden_layers", "short_conv", "rope_theta"}
    assert all(getattr(m, k) == getattr(memory, k) for m in (baseline, full) for k in same)


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
def test_neural_recipes_differ_from_their_task_recipe_only_in_the_memory(name):
    """experiment=NAME_neural is experiment=NAME with model/memory=neural: the task recipe's memory options are
    another kind's keys, which the neural schema refuses, so it cannot inherit the file; this checks that it copies
    everything else (backbone, data, task, steps, optimiser, seed)."""
    neural, base = compose([f"experiment={name}_neural"]), compose([f"experiment={name}"])
    assert neural.model.memory.kind == "neural" and base.model.memory.kind != "neural"
    for group in ("data", "task", "trainer", "optim", "precision", "parallel"):
        assert neural[group] == base[group], group
    assert neural.seed == base.seed
    assert {k: v for k, v in neural.model.items() if k != "memory"} == {k: v for k, v in base.model.items()
                                                                        if k != "memory"}
