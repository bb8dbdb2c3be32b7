"""Task generators: deterministic given a seed, exact lengths, and things placed where the sample says."""

from __future__ import annotations

import numpy as np
import pytest

from ltm_core.config import TaskConfig
from ltm_core.tasks import get_task
from ltm_core.tasks.babi_facts import ANSWER_SPAN, NAMES, ROOMS, make_babi_facts
from ltm_core.tasks.common import RULER_FILLER, insert, sample_rng
from ltm_core.tasks.mqar import KEYS, make_mqar
from ltm_core.tasks.passkey import NEEDLE_PREFIX, NEEDLE_SUFFIX, QUESTION, make_passkey
from ltm_core.tokenizer import BOS, ByteTokenizer

text = ByteTokenizer().decode


def rng(i: int = 0) -> np.random.Generator:
    return sample_rng(7, 0, i)


@pytest.mark.parametrize("name", ["passkey", "mqar", "babi_facts"])
def test_samples_are_a_pure_function_of_seed_and_index(name):
    task, cfg = get_task(name), TaskConfig(name=name, train_pairs=8)
    a = task.train_sample(sample_rng(3, 0, 11), 513, cfg, 64)
    b = task.train_sample(sample_rng(3, 0, 11), 513, cfg, 64)
    c = task.train_sample(sample_rng(3, 0, 12), 513, cfg, 64)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.targets == b.targets and a.answer == b.answer
    assert not np.array_equal(a.tokens, c.tokens)
    assert len(a.tokens) == 513 and a.tokens[0] == BOS and a.tokens.dtype == np.int64


@pytest.mark.parametrize("filler", ["ruler", "kjv"])
@pytest.mark.parametrize("length", [120, 1000, 5000])
def test_passkey_needle_at_its_depth(filler, length):
    for i, depth in enumerate([(0.0, 0.0), (0.3, 0.4), (1.0, 1.0)]):
        s = make_passkey(rng(i), length, digits=5, filler_name=filler, depth=depth)
        assert len(s.tokens) == length
        key = s.answer
        assert len(key) == 5 and key.isdigit()
        info = s.info
        assert text(s.tokens[info["needle_start"]:info["needle_end"]]) == f"{NEEDLE_PREFIX}{key}{NEEDLE_SUFFIX}"
        assert text(s.tokens[info["key_start"]:info["key_end"]]) == key
        assert depth[0] - 1e-9 <= info["depth"] <= depth[1] + 1e-9
        assert text(s.tokens[s.answer_start:]) == key and s.targets == [(length - 5, length)]
        assert text(s.tokens[:s.answer_start]).endswith(QUESTION)
        assert text(s.tokens).count("pass key is") == 2  # the needle and the question, nothing else
    first = make_passkey(rng(), length, filler_name=filler, depth=(0.0, 0.0))
    assert first.info["needle_start"] == 1  # right after BOS
    last = make_passkey(rng(), length, filler_name=filler, depth=(1.0, 1.0))
    assert last.info["needle_end"] == length - 5 - len(QUESTION)  # right before the question
    if filler == "ruler" and length > 200:
        assert text(last.tokens[1:40]) == RULER_FILLER[:39]


def test_ruler_filler_from_a_random_character_covers_every_phase():
    """task.filler_start=random: the RULER text from a random character, so a training sample's filler tokens take
    every place of the 90-character repetition against the segments; `first` (the default) is RULER's text as is."""
    period = len(RULER_FILLER)
    repeated = RULER_FILLER * 4
    starts = set()
    for i in range(2000):  # a phase missed by all 2,000: probability below 1e-7
        s = make_passkey(rng(i), 250, filler_name="ruler", depth=(1.0, 1.0), filler_start="random")
        head = text(s.tokens[1:1 + period])  # the filler before the needle, which sits at the end
        assert head in repeated
        starts.add(repeated.index(head))
        assert text(s.tokens[s.info["key_start"]:s.info["key_end"]]) == s.answer
    assert starts == set(range(period))
    fixed = make_passkey(rng(), 250, filler_name="ruler", depth=(1.0, 1.0))
    assert text(fixed.tokens[1:1 + period]) == RULER_FILLER
    cfg = TaskConfig(name="passkey", filler="ruler", filler_start="random")
    assert get_task("passkey").train_sample(rng(5), 150, cfg, 32).tokens[1:4].tolist() != \
        get_task("passkey").train_sample(rng(6), 150, cfg, 32).tokens[1:4].tolist()


def test_passkey_exact_needle_position_and_evaluation_placements():
    s = make_passkey(rng(), 300, needle_start=100)
    assert s.info["needle_start"] == 100 and text(s.tokens[100:100 + len(NEEDLE_PREFIX)]) == NEEDLE_PREFIX
    with pytest.raises(ValueError, match="needle_start"):
        make_passkey(rng(), 300, needle_start=300)
    with pytest.raises(ValueError, match="at least"):
        make_passkey(rng(), 60)
    task, cfg, seg = get_task("passkey"), TaskConfig(name="passkey", depth_bins=10), 64
    cells = task.cells(cfg, [256, 4096], seg)
    assert len(cells) == 2 * 12 and len({(c.length, c.code) for c in cells}) == len(cells)
    for cell in cells:
        for i in range(5):
            s = task.make(cell.rng(0, i), cell, cfg, seg)
            key_first, key_last = s.info["key_start"], s.info["key_end"] - 1
            if cell.placement == "first_segment":
                assert s.info["needle_start"] == 1 and s.info["needle_end"] <= seg  # the needle is in segment 0
            elif cell.placement == "straddle":
                assert key_first // seg < key_last // seg  # a segment boundary splits the digits
                assert abs(key_first - cell.length / 2) <= seg
            else:
                lo, hi = cell.depth
                assert lo - 1e-9 <= s.info["depth"] <= hi + 1e-9
            np.testing.assert_array_equal(s.tokens, task.make(cell.rng(0, i), cell, cfg, seg).tokens)


def test_one_digit_straddle_puts_the_boundary_right_before_the_key():
    """A one-digit key cannot be split, so its straddle cell splits the needle line: "The pass key is" ends one
    segment and the digit opens the next."""
    task, cfg, seg = get_task("passkey"), TaskConfig(name="passkey", digits=1, depth_bins=2), 32
    cells = [c for c in task.cells(cfg, [96, 400], seg) if c.placement == "straddle"]
    assert len(cells) == 2 and all(c.skip is None for c in cells)
    for cell in cells:
        for i in range(3):
            s = task.make(cell.rng(0, i), cell, cfg, seg)
            assert s.info["key_start"] % seg == 0 and s.info["needle_start"] // seg < s.info["key_start"] // seg
            assert text(s.tokens[s.info["key_start"] - len(NEEDLE_PREFIX):s.info["key_start"]]) == NEEDLE_PREFIX
    assert task.cells(cfg, [60], seg)[-1].skip is not None  # too short for any placement


def test_kjv_filler_of_evaluation_comes_from_held_out_books():
    train = make_passkey(rng(), 2000, filler_name="kjv", split="train", depth=(0, 0))
    held_out = make_passkey(rng(), 2000, filler_name="kjv", split="eval", depth=(0, 0))
    from ltm_core.tasks.common import _kjv

    tail = text(held_out.tokens[-200:-100])
    assert tail in _kjv("eval")[0] and tail not in _kjv("train")[0]
    assert text(train.tokens[-200:-100]) in _kjv("train")[0]


@pytest.mark.parametrize("pairs,key_length", [(1, 2), (8, 2), (32, 2), (1, 1), (8, 1), (36, 1)])
def test_mqar_layout(pairs, key_length):
    seg = 64
    s = make_mqar(rng(pairs), 1024, pairs, seg, gap_segments=1, key_length=key_length)
    assert len(s.tokens) == 1024 and len(s.targets) == pairs
    body = text(s.tokens[1:s.info["pairs_end"]])
    context = dict((p[:key_length], p[key_length:]) for p in body.split())
    assert len(context) == pairs and all(len(v) == 1 and v.isupper() for v in context.values())
    assert all(k in KEYS[key_length] and not any(c.isupper() for c in k) for k in context)
    queries = text(s.tokens[s.info["queries_start"]:]).split()
    assert sorted(q[:key_length] for q in queries) == sorted(context)
    for (start, end), query in zip(s.targets, queries):
        assert end == start + 1
        assert text(s.tokens[start - key_length:start]) == query[:key_length]  # the key just before the value
        assert text(s.tokens[start:end]) == context[query[:key_length]]
    noise = text(s.tokens[s.info["pairs_end"]:s.info["queries_start"]])
    assert not any(c.isupper() for c in noise)  # values are the only upper-case letters
    # at least one whole segment between the segment of the last pair and the first query
    assert (s.info["queries_start"] // seg) - ((s.info["pairs_end"] - 1) // seg) >= 2
    with pytest.raises(ValueError, match="needs at least"):
        make_mqar(rng(), 200, 32, seg, key_length=key_length)


def test_mqar_one_character_keys_hold_at_most_36_pairs():
    with pytest.raises(ValueError, match=r"pairs must be in \[1, 36\] with 1-character keys"):
        make_mqar(rng(), 4096, 37, 64, key_length=1)


def test_babi_facts_answer_is_the_last_fact_about_the_person():
    moved = []
    for i in range(20):
        s = make_babi_facts(rng(i), 1500, facts=6, names=4)
        assert len(s.tokens) == 1500 and s.answer in ROOMS
        facts = [text(s.tokens[p:p + 40]).split("\n")[1] for p in s.info["fact_starts"]]
        assert len(facts) == 6 and all(f.split()[0] in NAMES[:4] for f in facts)
        name = s.info["name"]
        last = [f for f in facts if f.startswith(name + " ")][-1]
        assert last.endswith(f"the {s.answer}.")
        assert text(s.tokens[s.info["supporting_fact"]:s.info["supporting_fact"] + 40]).split("\n")[1] == last
        assert text(s.tokens[:s.answer_start]).endswith(f"Where is {name}? {name} is in the ")
        final = max(i for i, f in enumerate(facts) if f.startswith(name + " "))
        left = {f.rstrip(".").split()[-1] for f in facts[:final] if f.startswith(name + " ")}
        assert s.info["overwritten_rooms"] == sorted(left - {s.answer})  # rooms the person had left
        moved.append(bool(left - {s.answer}))
    assert 0 < sum(moved) < len(moved)  # some samples test overwriting, some retrieval only


def test_babi_facts_prompt_end_does_not_reveal_the_answer_length():
    """Rooms have 6-8 letters. Were the answer the last tokens of the sample, where the prompt ends inside its
    segment would tell a model the room's length (a no-memory model scored ~50 % that way, chance 17 %): the
    answer is padded to ANSWER_SPAN, so every sample of a length has the same answer_start."""
    samples = [make_babi_facts(rng(i), 300, facts=6, names=4) for i in range(40)]
    assert len({s.answer for s in samples}) == len(ROOMS)
    assert {s.answer_start for s in samples} == {300 - ANSWER_SPAN}
    for s in samples:
        assert text(s.tokens[s.answer_start:]) == (s.answer + ".").ljust(ANSWER_SPAN)
        assert s.targets == [(s.answer_start, s.answer_start + len(s.answer))]


def test_babi_facts_curriculum_draws_one_to_train_facts_facts_for_training_only():
    """task.train_facts: training samples hold 1..train_facts facts (each count appears), evaluation samples
    exactly `facts`; None keeps training at `facts`."""
    task = get_task("babi_facts")
    cfg = TaskConfig(name="babi_facts", facts=6, train_facts=3)
    counts = [len(task.train_sample(sample_rng(3, 0, i), 256, cfg, 32).info["fact_starts"]) for i in range(60)]
    assert set(counts) == {1, 2, 3}
    cell = task.cells(cfg, [256], 32)[0]
    assert len(task.make(sample_rng(3, 0, 0), cell, cfg, 32).info["fact_starts"]) == 6
    fixed = TaskConfig(name="babi_facts", facts=6)
    assert {len(task.train_sample(sample_rng(3, 0, i), 256, fixed, 32).info["fact_starts"]) for i in range(5)} == {6}
    assert task.min_length(TaskConfig(name="babi_facts", facts=2, train_facts=6), 32) == task.min_length(fixed, 32)


def test_insert_and_training_labels():
    assert insert("abcdef", [(0, "X"), (3, "Y"), (3, "Z"), (6, "W")]) == ("XabcYZdefW", [0, 4, 5, 9])
    s = make_passkey(rng(), 200)
    x, y = s.training_pair()
    assert x.shape == y.shape == (199,)
    assert (y != -100).sum() == 5 and text(y[y != -100].tolist()) == s.answer
    _, y_all = s.training_pair(lm_loss=True)
    assert (y_all != -100).all()
