"""Training runs through the Python API: exact resume, output-folder safety, schedule, data."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support import TINY
from ltm_core.checkpoint import load_model, read_checkpoint
from ltm_core.config import DataConfig, OptimConfig
from ltm_core.configuration import compose
from ltm_core.data import RandomWindows, load_corpus, textfile_corpus, unigram_bpb
from ltm_core.errors import DataError, LtmError
from ltm_core.inference import InferenceConfig, InferenceEngine
from ltm_core.train import train
from ltm_core.training import build_optimizer, build_scheduler


def _train(out, *overrides):
    return train(compose(TINY + [f"output_dir={out}", *overrides]))


def _weights(ckpt_path):
    return read_checkpoint(ckpt_path)["state_dict"]


def test_resume_is_exact(tmp_path):
    """10 steps + resume 10 steps == 20 steps straight (weights, optimizer, data order, schedule)."""
    straight = _train(tmp_path / "a", "trainer.max_steps=20", "optim.warmup_steps=3")
    _train(tmp_path / "b", "trainer.max_steps=10", "optim.schedule_steps=20", "optim.warmup_steps=3")
    resumed = _train(tmp_path / "b", "trainer.max_steps=20", "optim.warmup_steps=3", "resume=auto")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[1]) for r in rows[1:] if r.split(",")[2]]  # rows with a train/loss
    assert steps == list(range(20))  # metrics.csv keeps the first run's rows and appends the second's


def test_output_folder_is_never_overwritten_by_accident(tmp_path):
    out = tmp_path / "run"
    _train(out, "trainer.max_steps=2")
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(LtmError, match="already holds a run"):
        _train(out, "trainer.max_steps=2")
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
    with pytest.raises(LtmError, match="model.hidden_size=32, not 64"):
        _train(out, "trainer.max_steps=4", "resume=auto", "model.hidden_size=64")
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
    _train(out, "trainer.max_steps=3", "overwrite=true")
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_schedule_warmup_then_cosine():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=14)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {1: 0.1} or sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


def test_the_optimizer_is_fused_and_steps_as_pytorchs_adamw():
    """`build_optimizer` fuses AdamW's update into one kernel per parameter (tensor parallelism's DTensors take the
    default: `tests/parallel`' bench test runs tp2 through it) and steps as PyTorch's unfused AdamW."""
    from ltm_core.configuration import model_config
    from ltm_core.model import TitanModel

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    models = [TitanModel(model_config(compose(TINY))) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = [p.detach().clone() for p in models[0].parameters()]
    fused = build_optimizer(models[0], cfg)
    assert fused.defaults["fused"]
    twin = {id(p): q for p, q in zip(models[0].parameters(), models[1].parameters())}
    groups = [{"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all((p - b).abs().max() > 1e-4 for p, b in zip(models[0].parameters(), before))  # every one stepped


def test_random_windows_are_a_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a = list(zip(range(6), RandomWindows(tokens, 16, seed=3)))
    b = list(zip(range(3), RandomWindows(tokens, 16, seed=3, start=3)))
    for (_, (x1, y1)), (_, (x2, y2)) in zip(a[3:], b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = a[0][1]
    assert torch.equal(y[:-1], x[1:])  # labels are the next tokens
    rank0 = [x for _, (x, _) in zip(range(3), RandomWindows(tokens, 16, 3, rank=0, world=2))]
    rank1 = [x for _, (x, _) in zip(range(3), RandomWindows(tokens, 16, 3, rank=1, world=2))]
    assert torch.equal(rank0[1], a[2][1][0]) and torch.equal(rank1[0], a[1][1][0])  # disjoint interleaving


def test_dataloader_workers_yield_the_single_process_stream():
    from torch.utils.data import DataLoader

    tokens = np.arange(5000, dtype=np.uint16)
    batches = [DataLoader(RandomWindows(tokens, 16, 3, start=4, batch_size=3), batch_size=3, num_workers=w)
               for w in (0, 2)]
    for (x0, _), (x2, _), _ in zip(*batches, range(5)):
        assert torch.equal(x0, x2)


def test_textfile_txt_and_jsonl_with_cache(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 200)
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} é"}) for i in range(100)))
    cfg = DataConfig(name="textfile", path=str(folder), seq_len=64, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert len(corpus.train) + len(corpus.val) == (12 * 200 + 2) + sum(len(f"line {i} é".encode()) + 2
                                                                        for i in range(100))
    assert isinstance(corpus.train, np.memmap) or isinstance(corpus.train.base, np.memmap)
    monkeypatch.setattr("ltm_core.data._encode_documents", lambda texts: pytest.fail("cache was not used"))
    again = textfile_corpus(cfg)
    assert np.array_equal(np.asarray(again.train), np.asarray(corpus.train))


@pytest.mark.parametrize("content, message", [("", "is empty"), ('{"txt": 1}\n', 'no "text"'),
                                              ("not json\n", "not a JSON object")])
def test_textfile_bad_input(tmp_path, content, message):
    suffix = ".txt" if content == "" else ".jsonl"
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    cfg = DataConfig(name="textfile", path=str(path), seq_len=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message.replace('"', '.')):
        load_corpus(cfg)


def test_kjv_split_holds_out_last_books_and_beats_nothing_trivially():
    corpus = load_corpus(DataConfig(name="kjv", seq_len=64))
    assert "Jude, Revelation" in corpus.description
    head = bytes(np.asarray(corpus.train[1:40], dtype=np.uint8)).decode()
    assert head.startswith("Genesis 1:1 In the beginning")
    assert bytes(np.asarray(corpus.val[1:9], dtype=np.uint8)).decode() == "Jude 1:1"
    assert 4.0 < unigram_bpb(corpus) < 5.0  # English bytes carry ~4.4 bits under a unigram model


def test_trained_checkpoint_loads_and_generates(tmp_path):
    last = _train(tmp_path / "g", "trainer.max_steps=2")
    model = load_model(last)
    engine = InferenceEngine(model, InferenceConfig(temperature=0))
    out = engine.generate(torch.tensor([[256, 65, 66]]), max_new_tokens=5)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], torch.tensor([[256, 65, 66]]))


def _fake_stdlib(root: Path) -> None:
    """A standard-library folder: modules, a package, and the folders data=pystdlib leaves out."""
    for name, text in {"zeta.py": "import os\n" * 50, "abc.py": "class A:\n    pass\n" * 40,
                       "email/__init__.py": "from email.parser import parse\n" * 5, "email/parser.py": "def parse(x):\n    return x\n" * 30,
                       "test/test_abc.py": "import abc\n", "email/tests/t.py": "x = 1\n", "pydoc_data/topics.py": "{}",
                       "encodings/cp1252.py": "table = ()\n", "site-packages/pkg/mod.py": "y = 2\n",
                       "README.txt": "not python"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_pystdlib_is_the_modules_split_by_a_hash_of_their_path(tmp_path, monkeypatch):
    import sysconfig

    from ltm_core.data import is_validation_document, pystdlib_files
    from ltm_core.tokenizer import BOS

    root = tmp_path / "lib"
    _fake_stdlib(root)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    _, files = pystdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == ["abc.py", "email/__init__.py", "email/parser.py", "zeta.py"]  # sorted; tests etc. left out
    fraction = 0.5
    val = [n for n in names if is_validation_document(n, fraction)]
    assert 0 < len(val) < len(names)  # this fraction splits these four names (the hash is fixed)
    cfg = DataConfig(name="pystdlib", seq_len=8, val_fraction=fraction, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)

    def documents(tokens) -> list[str]:
        tokens = np.asarray(tokens)
        starts = list(np.flatnonzero(tokens == BOS)) + [len(tokens)]
        assert starts[0] == 0  # a split starts at a document
        return [bytes(tokens[a + 1:b - 1].astype(np.uint8)).decode() for a, b in zip(starts, starts[1:])]

    text = {n: (root / n).read_text() for n in names}
    assert documents(corpus.val) == [text[n] for n in val]
    assert documents(corpus.train) == [text[n] for n in names if n not in val]
    assert f"{len(names) - len(val)} modules train, {len(val)} validation" in corpus.description
    monkeypatch.setattr("ltm_core.data._encode_documents", lambda texts: pytest.fail("cache was not used"))
    assert np.array_equal(np.asarray(load_corpus(cfg).val), np.asarray(corpus.val))


def test_pystdlib_without_sources_or_without_a_split_is_one_clear_error(tmp_path, monkeypatch):
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(DataError, match="found no .py files under .* use data=textfile"):
        load_corpus(DataConfig(name="pystdlib", seq_len=8, cache_dir=str(tmp_path / "cache")))
    (tmp_path / "only.py").write_text("x = 1\n" * 20)
    with pytest.raises(DataError, match="leaves (no|every) module of the 1 for validation"):
        load_corpus(DataConfig(name="pystdlib", seq_len=8, cache_dir=str(tmp_path / "cache")))


def test_pystdlib_of_this_python():
    corpus = load_corpus(DataConfig(name="pystdlib", seq_len=1024))
    assert "standard library source" in corpus.description
    assert len(corpus.train) > 2_000_000 and len(corpus.val) > 50_000  # megabytes of code, a held-out share
    head = bytes(np.asarray(corpus.val[1:2000], dtype=np.uint8)).decode(errors="replace")
    assert "def " in head or "class " in head or "import " in head


@pytest.mark.parametrize("fails", [False, True])
def test_fit_ends_the_process_group_lightning_created(tmp_path, monkeypatch, fails):
    """Lightning's DDP leaves its gloo group to the interpreter's exit, whose teardown sometimes aborts a worker after
    a run that succeeded (exit -6): `fit` destroys a group that appeared during the run, and never one that was there
    before it."""
    import torch.distributed as dist

    import ltm_core.lit
    from ltm_core.train import fit

    def fake_fit_lightning(cfg, threads, corpus=None, datamodule=None, model=None):
        if not dist.is_initialized():  # as Lightning's DDP strategy does in each worker
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if fails:
            raise RuntimeError("a rank failed")
        return tmp_path / "last.ckpt"

    monkeypatch.setattr(ltm_core.lit, "fit_lightning", fake_fit_lightning)
    cfg = compose(TINY + [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        fit(cfg)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:  # a group the caller made stays the caller's
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            fit(cfg)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
