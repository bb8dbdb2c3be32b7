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
