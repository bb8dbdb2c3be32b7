"""Byte-level tokenizer: ids 0-255 are UTF-8 bytes, then BOS, EOS and PAD. Nothing to download."""

from __future__ import annotations

import codecs
from typing import Iterable

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, VOCAB_SIZE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes of `text`. Surrogates that stand for undecodable bytes (how Python reads such command-line
        arguments and file names) become those bytes; any other lone surrogate becomes "?"."""
        try:
            ids = list(text.encode("utf-8", errors="surrogateescape"))
        except UnicodeEncodeError:
            ids = list(text.encode("utf-8", errors="replace"))
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function that takes one id at a time and returns the text completed so far (UTF-8 safe)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: decoder.decode(bytes([i])) if i < 256 else ""


def prompt_from(ids: Iterable[int], max_bytes: int = 40) -> str:
    """The first words of a token sequence (e.g. a run's validation split), as a prompt for `ltm generate`: from its
    first document start (BOS), else its first line or word start; one line, at most `max_bytes`, cut at a space."""
    head = [int(i) for _, i in zip(range(4096), ids)]
    if BOS in head:
        head = head[head.index(BOS) + 1:]
    else:  # a split that starts mid-document: begin at the next line, else the next word
        for sep in (0x0A, 0x20):
            if sep in head:
                head = head[head.index(sep) + 1:]
                break
    line = bytearray()
    for i in head:
        if i >= 256 or i == 0x0A:  # EOS, PAD or the end of the line
            break
        line.append(i)
    text = bytes(line[:max_bytes]).decode("utf-8", errors="ignore")
    if len(line) > max_bytes and " " in text.strip():
        text = text.strip().rsplit(" ", 1)[0]
    return text.strip()
