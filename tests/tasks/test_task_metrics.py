"""Metric functions on hand-made cases, and the streaming runner against one full forward pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from support import tiny_model
from ltm_core.config import TaskConfig
from ltm_core.errors import ConfigError
from ltm_core.inference import InferenceConfig, InferenceEngine
from ltm_core.tasks import get_task
from ltm_core.tasks.common import Cell
from ltm_core.tasks.evaluate import evaluate_task, greedy_decode, prefill, teacher_forced_argmax
from ltm_core.tasks.metrics import digit_accuracy, exact_match, label_match, position_accuracy


def test_exact_match_and_digit_accuracy():
    assert exact_match("48213", "48213") == 1.0
    assert exact_match("48212", "48213") == 0.0
    assert exact_match("4821", "48213") == 0.0
    assert digit_accuracy("48213", "48213") == 1.0
    assert digit_accuracy("48299", "48213") == pytest.approx(3 / 5)
    assert digit_accuracy("4", "48213") == pytest.approx(1 / 5)  # missing digits count as wrong
    assert digit_accuracy("84213", "48213") == pytest.approx(3 / 5)
    assert digit_accuracy("", "12") == 0.0
    with pytest.raises(ValueError):
        digit_accuracy("1", "")


def test_label_match_names_the_label_the_text_begins_with():
    rooms = ["kitchen", "garden", "bathroom", "bedroom"]
    assert label_match("kitchen.\n", "kitchen", rooms) == 1.0
    assert label_match("kitchens", "kitchen", rooms) == 1.0  # ran on after naming the label: samples end there
    assert label_match("bathroomr", "bedroom", rooms) == 0.0
    assert label_match("kitch", "kitchen", rooms) == 0.0  # names no label
    assert label_match(" kitchen", "kitchen", rooms) == 0.0  # the answer follows "is in the " directly
    assert label_match("garden", "kitchen", rooms) == 0.0
    with pytest.raises(ValueError, match="prefix-free"):
        label_match("bed", "bed", ["bed", "bedroom"])


def test_position_accuracy():
    predicted = torch.tensor([[1, 2, 3, 4], [1, 0, 0, 4]])
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    torch.testing.assert_close(position_accuracy(predicted, target), torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("use_memory", [True, False])
def test_streaming_runner_matches_one_forward_pass(tiny_cfg, use_memory):
    model = tiny_model(dataclasses.replace(tiny_cfg, use_memory=use_memory)).eval()
    ids = torch.randint(0, 256, (3, 5 * tiny_cfg.segment_length + 7), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    last, state = prefill(model, ids)
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-5)
    assert state.offset == 7 and state.segments == 5  # a bounded state: one partial segment is pending
    positions = [1, 15, 16, 17, 40, ids.shape[1] - 1]
    expected = full[:, [p - 1 for p in positions]].argmax(-1)
    torch.testing.assert_close(teacher_forced_argmax(model, ids, positions), expected)
    engine = InferenceEngine(model, InferenceConfig(temperature=0, stop_at_eos=False))
    reference = engine.generate(ids, 6)[:, ids.shape[1]:]
    torch.testing.assert_close(greedy_decode(model, ids, 6), reference)


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
def test_evaluate_task_rows_and_schema(tiny_cfg, name):
    model = tiny_model(tiny_cfg)
    cfg = TaskConfig(name=name, samples=3, batch_size=2, lengths=[256, 512], depth_bins=2, pairs=[2, 40])
    results = evaluate_task(model, cfg, train_length=128)
    assert results["task"] == name and results["train_length"] == 128 and results["lengths"] == [256, 512]
    rows = results["rows"]
    expected_cells = {"passkey": 2 * 4, "mqar": 2 * 2, "babi_facts": 2}[name]
    assert len(rows) == expected_cells
    for row in rows:
        assert {"length", "depth", "pairs", "samples", "exact_match"} <= set(row)
        if row.get("skipped"):
            assert row["samples"] == 0 and row["exact_match"] is None
        else:
            assert row["samples"] == 3 and 0.0 <= row["exact_match"] <= 1.0
    if name == "mqar":
        assert [r.get("skipped") is not None for r in rows] == [False, True, False, False]  # 40 pairs need > 256
        one = evaluate_task(model, TaskConfig(name=name, samples=2, batch_size=2, lengths=[512], pairs=[2, 40],
                                              key_length=1), train_length=128)
        assert one["sample_settings"]["key_length"] == 1 and results["sample_settings"]["key_length"] == 2
        rows = one["rows"]
        assert rows[0].get("skipped") is None and "at most 36 pairs" in rows[1]["skipped"]  # 36 one-character keys
        with pytest.raises(ConfigError, match="task.pairs: no mqar sample fits in 512 tokens .*at most 36 pairs"):
            evaluate_task(model, TaskConfig(name=name, samples=2, batch_size=2, lengths=[512], pairs=[40],
                                            key_length=1), train_length=128)  # the pairs, not the length, to change
    # an untrained model is at chance: passkey digits ~ 1/10, no exact matches
    if name == "passkey":
        assert all(r["exact_match"] == 0.0 for r in rows)
    # a length no cell fits in is an error naming it, not a table of empty cells
    with pytest.raises(ConfigError, match=f"task.lengths: no {name} sample fits in 5 tokens"):
        evaluate_task(model, dataclasses.replace(cfg, lengths=[256, 5]), train_length=128)


def test_scores_with_a_perfect_answerer(monkeypatch):
    """The scorers count a correct answer as right: feed them a 'model' that replays the sample's tokens."""
    task, cfg = get_task("passkey"), TaskConfig(name="passkey")
    cell = Cell(300, 0, depth=(0.2, 0.3), placement="depth")
    samples = [task.make(cell.rng(0, i), cell, cfg, 64) for i in range(3)]
    answers = [s.answer for s in samples]
    import ltm_core.tasks.evaluate as runner

    monkeypatch.setattr(runner, "decode_answers", lambda model, ss, n: [s.answer for s in ss])
    scores = task.score(None, samples)
    assert scores == {"exact_match": [1.0] * 3, "digit_accuracy": [1.0] * 3}
    monkeypatch.setattr(runner, "decode_answers", lambda model, ss, n: [a[:-1] + "x" for a in answers])
    assert task.score(None, samples)["digit_accuracy"] == [pytest.approx(0.8)] * 3


def test_babi_facts_scores_the_samples_after_a_move_apart(monkeypatch):
    """A 'model' that answers right, then one that answers a room the person had left wherever there is one:
    overwrite_match and stale_answer are over the samples whose person moved, overwrite_share their share."""
    task, cfg = get_task("babi_facts"), TaskConfig(name="babi_facts")
    samples = [task.make(Cell(600, 0).rng(0, i), Cell(600, 0), cfg, 64) for i in range(12)]
    share = [float(bool(s.info["overwritten_rooms"])) for s in samples]
    assert 0 < sum(share) < len(share)
    import ltm_core.tasks.evaluate as runner

    monkeypatch.setattr(runner, "decode_answers", lambda model, ss, n: [s.answer + ".  " for s in ss])
    moved = int(sum(share))
    assert task.score(None, samples) == {"exact_match": [1.0] * 12, "overwrite_share": share,
                                         "overwrite_match": [1.0] * moved, "stale_answer": [0.0] * moved}
    monkeypatch.setattr(runner, "decode_answers",
                        lambda model, ss, n: [(s.info["overwritten_rooms"] or [s.answer])[-1] for s in ss])
    assert task.score(None, samples) == {"exact_match": [1.0 - m for m in share], "overwrite_share": share,
                                         "overwrite_match": [0.0] * moved, "stale_answer": [1.0] * moved}


def test_mqar_scores_every_query_and_the_first_alone(monkeypatch):
    """A 'model' that gets every query right but the first one, then one that gets only the first right."""
    task, cfg = get_task("mqar"), TaskConfig(name="mqar")
    cell = Cell(129, 4, pairs=4)
    samples = [task.make(cell.rng(0, i), cell, cfg, 32) for i in range(2)]
    import ltm_core.tasks.evaluate as runner

    for wrong, accuracy, first in ((0, 0.75, 0.0), (slice(1, None), 0.25, 1.0)):
        def replay(model, tokens, positions, wrong=wrong):
            answers = tokens[:, positions].clone()  # [B, pairs]
            answers[:, wrong] = (answers[:, wrong] + 1) % 256
            return answers

        monkeypatch.setattr(runner, "teacher_forced_argmax", replay)
        scores = task.score(torch.nn.Linear(1, 1), samples)  # the scorer only asks the model for its device
        assert scores == {"accuracy": [accuracy] * 2, "exact_match": [0.0] * 2, "first_query_accuracy": [first] * 2}


def test_mqar_table_shows_the_accuracy_and_the_first_query():
    from rich.console import Console

    from ltm_core.tasks.report import results_table

    rows = [{"length": 192, "depth": None, "pairs": 4, "placement": None, "samples": 100, "exact_match": 0.1,
             "accuracy": 0.28, "first_query_accuracy": 0.12},
            {"length": 192, "depth": None, "pairs": 8, "placement": None, "samples": 100, "exact_match": 0.0,
             "accuracy": 0.2}]  # a file written before first_query_accuracy existed
    results = {"task": "mqar", "train_length": 192, "segment_length": 32, "seed": 0, "filler": "kjv",
               "memory": True, "rows": rows}
    console = Console(record=True, width=200)
    console.print(results_table(results))
    line = next(line for line in console.export_text().splitlines() if line.strip().startswith("192"))
    assert "28 / 12" in line and line.rstrip().endswith("20"), line


def test_babi_facts_table_shows_the_samples_after_a_move():
    from rich.console import Console

    from ltm_core.tasks.report import results_table

    rows = [{"length": 2048, "depth": None, "pairs": None, "placement": None, "samples": 400, "exact_match": 0.385,
             "overwrite_share": 0.77, "overwrite_match": 0.31, "stale_answer": 0.22},
            {"length": 4096, "depth": None, "pairs": None, "placement": None, "samples": 100,
             "exact_match": 0.32}]  # a file written before the move metrics existed
    results = {"task": "babi_facts", "train_length": 256, "segment_length": 64, "seed": 0, "filler": "kjv",
               "memory": True, "rows": rows}
    console = Console(record=True, width=200)
    console.print(results_table(results))
    lines = console.export_text().splitlines()
    assert "after a move: share %" in "\n".join(lines) and "room left %" in "\n".join(lines)
    assert next(ln for ln in lines if ln.strip().startswith("2,048")).split() == ["2,048", "38", "77", "31", "22",
                                                                                 "400"]
    assert next(ln for ln in lines if ln.strip().startswith("4,096")).split() == ["4,096", "32", "–", "–", "–", "100"]
