"""Text that is not UTF-8: `data=textfile` trains on any file but says, in one note line on stderr, when a file is
largely not valid UTF-8 or NUL (Latin-1, binary), once per run and also when the token cache is read; UTF-8 text
never gets it. The `generate` prompt printed after a run holds only bytes the data holds (`prompt_from`)."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import numpy as np
import pytest

from ltm_core import data as data_module
from ltm_core.config import DataConfig
from ltm_core.data import load_corpus
from ltm_core.tokenizer import BOS, EOS, ByteTokenizer, prompt_from
from support import TINY, invoke

LATIN1 = ("Le café du marché est fermé à l'heure où la forêt s'éveille. Élève, garçon, naïve, œuvre. " * 60
          ).replace("œ", "oe").encode("latin-1")
UTF8 = "Le café du marché est fermé. Ünïcödé, 日本語, emoji 🙂, and a real \ufffd replacement char. " * 60


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    """Each test its own process-wide record of the corpora noted (a run in its own process starts with none)."""
    monkeypatch.setattr(data_module, "_NOTED", set(), raising=False)
    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "RANK",
                "LTM_RESUME_COMMAND"):
        monkeypatch.delenv(key, raising=False)


def _train(path: Path, out: Path, *extra: str):
    result = invoke("train", *TINY, "data=textfile", f"data.path={path}", f"output_dir={out}", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "data.val_samples=2", *extra)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    return result


def _notes(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("note:") and "UTF-8" in line]


def _load(path: Path, cache: Path):
    return load_corpus(DataConfig(name="textfile", path=str(path), seq_len=64, cache_dir=str(cache)))


def test_latin1_and_binary_files_train_with_one_note_also_from_the_cache(tmp_path, monkeypatch):
    latin1, binary = tmp_path / "latin1.txt", tmp_path / "blob.txt"
    latin1.write_bytes(LATIN1)
    binary.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(6000)) + b"\x00" * 400)
    cache = tmp_path / "cache"
    first = _train(latin1, tmp_path / "a", f"data.cache_dir={cache}")
    (note,) = _notes(first.stderr)  # the run loads its corpus more than once: one line
    share = round(100 * sum(b >= 0x80 for b in LATIN1) / len(LATIN1))  # each accented letter: one byte
    assert note == (f"note: {latin1}: {share} % of its bytes are not valid UTF-8 (Latin-1 or another 8-bit "
                    "encoding?); bytes that are not UTF-8 are read as U+FFFD, and training goes on"), note
    # the printed prompt: bytes of the validation data, quoted for the shell
    (line,) = [ln for ln in first.stdout.splitlines() if "ltm generate" in ln]
    prompt = shlex.split(line)[-1].encode("utf-8")
    val = np.asarray(_load(latin1, cache).val)
    assert prompt and prompt in bytes(int(i) for i in val if i < 256)

    monkeypatch.setattr(data_module, "_NOTED", set(), raising=False)  # a second run (its own process): the tokens from the cache
    second = _train(latin1, tmp_path / "b", f"data.cache_dir={cache}")
    assert "token cache" not in second.stderr and _notes(second.stderr) == [note]

    third = _train(binary, tmp_path / "c", f"data.cache_dir={cache}")
    (note,) = _notes(third.stderr)
    assert note.startswith(f"note: {binary}: ") and "of its bytes are NUL or not valid UTF-8 (binary, or UTF-16?)" \
        in note, note


def test_cache_without_its_byte_record_still_gives_the_note(tmp_path, capfd):
    """A token cache built before the record of the files' bytes was kept: measured from the files, then kept."""
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    _load(tmp_path / "latin1.txt", tmp_path / "cache")
    assert len(_notes(capfd.readouterr().err)) == 1
    (record,) = (tmp_path / "cache").glob("bytes-*.json")
    record.unlink()
    data_module._NOTED.clear()
    _load(tmp_path / "latin1.txt", tmp_path / "cache")
    assert len(_notes(capfd.readouterr().err)) == 1 and record.exists()
    _load(tmp_path / "latin1.txt", tmp_path / "cache")  # the same process: said already
    assert _notes(capfd.readouterr().err) == []


def test_utf8_text_gets_no_note(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(UTF8, encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": UTF8[i:i + 300]}, ensure_ascii=False) + "\n"
                                            for i in range(0, len(UTF8), 300)), encoding="utf-8")
    result = _train(folder, tmp_path / "run")
    assert _notes(result.stderr) == [] and "U+FFFD" not in result.stderr


def test_folder_gets_one_line_naming_the_worst_file(tmp_path, capfd):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(UTF8, encoding="utf-8")
    (folder / "b.txt").write_bytes(LATIN1)
    (folder / "sub" / "c.txt").write_bytes(b"ascii \x00\x00\x00\x00\x00\x00 " * 200)
    (folder / "d.txt").write_bytes(UTF8.encode() + b"\xff")  # one stray byte: under 1 %
    _load(folder, tmp_path / "cache")
    (note,) = _notes(capfd.readouterr().err)
    assert note.startswith(f"note: 2 of the 4 files in {folder} are not UTF-8 text, e.g. sub/c.txt: 46 % of its "
                           "bytes are NUL (binary, or UTF-16?); bytes that are not UTF-8 are read as U+FFFD"), note


def test_only_the_process_that_speaks_for_the_run_gives_the_note(tmp_path, capfd, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    for env, says in (({"LOCAL_RANK": "0", "LTM_RESUME_COMMAND": "ltm train"}, False),  # `ltm train`'s own worker
                      ({"LOCAL_RANK": "1", "RANK": "1"}, False),  # torchrun, rank 1
                      ({"LOCAL_RANK": "0", "RANK": "0"}, True)):  # torchrun, rank 0
        data_module._NOTED.clear()
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            _load(tmp_path / "latin1.txt", tmp_path / "cache")
        assert len(_notes(capfd.readouterr().err)) == int(says), env


def test_bytes_are_read_as_before_and_counted_exactly():
    """`_decode` gives the text `read_text(encoding="utf-8", errors="replace")` gives (so the tokens are those of
    caches built before), and counts each byte that is not valid UTF-8 once; a real U+FFFD counts for nothing."""
    rng = random.Random(1)
    pieces = [b"\r", b"\n", b"\r\n", b"a", b"\xc3\xa9", b"\xe9", b"\xff", b"\x00", b"\xe2\x82", b"\xef\xbf\xbd",
              b"\xf0\x9f\x98\x80", b"\xed\xa0\x80", b" "]
    for _ in range(2000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        text, invalid = data_module._decode(raw)
        assert text == raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        escaped = raw.decode("utf-8", errors="surrogateescape")
        assert invalid == sum(0xDC80 <= ord(c) <= 0xDCFF for c in escaped)
    assert data_module._decode("\ufffd ünï 🙂".encode())[1] == 0
    assert data_module._decode(b"caf\xe9 \xe2\x82")[1] == 3


def test_jsonl_text_with_a_lone_surrogate_trains(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} \ud800 and \udcff here"}) + "\n" for i in range(300)))
    tokens = [int(i) for i in _load(path, tmp_path / "cache").train[:60]]
    assert tokens[:tokens.index(EOS) + 1] == ByteTokenizer().encode("line 0 \ud800 and \udcff here", bos=True, eos=True)


def test_prompt_from_holds_only_bytes_the_data_holds():
    latin1 = list(b"Le caf\xe9 du march\xe9 est ferm\xe9")
    for ids in ([BOS, *latin1, EOS], latin1, [BOS, *b"caf\xc3", EOS], [BOS, *b"abc\x00def", EOS]):
        prompt = prompt_from(ids).encode("utf-8")  # what the shell hands `ltm generate`: bytes the data holds
        assert prompt and prompt in bytes(i for i in ids if i < 256), (ids, prompt)
    assert prompt_from([BOS, *latin1, EOS]) == "Le caf"  # ends before the first byte that is not UTF-8
    assert prompt_from([BOS, *b"\xe9t\xe9", EOS]) == ""
    assert prompt_from([BOS, *b"abc\x00def", EOS]) == "abc"  # no argument can hold a NUL
    tok = ByteTokenizer()
    assert prompt_from(tok.encode("caf\ufffd au lait", bos=True)) == "caf\ufffd au lait"  # valid text, kept
    assert prompt_from(tok.encode("ünïcödé " * 10, bos=True), max_bytes=13) == "ünïcödé"
    assert prompt_from([BOS, *"ünïcödé ünïcödé".encode(), 0xE9, EOS], max_bytes=13) == "ünïcödé"
