"""scripts/memory_contents.py: the positions it reports are the tokens the select write keeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from support import tiny_model

from ltm_core import TitanConfig
from ltm_core.tasks.evaluate import prefill

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_contents.py"


def load_script():
    spec = importlib.util.spec_from_file_location("memory_contents", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokens_model(slots: int):
    cfg = TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, memory_slots=slots, memory_dim=32,
                      segment_length=8, memory_write="select", memory_read="tokens", write_from="block")
    return tiny_model(cfg).eval()


def test_with_room_for_every_token_all_positions_are_held_in_order():
    model, tokens = tokens_model(slots=32), torch.randint(0, 256, (2, 28))  # 3 whole segments of 8, 4 pending
    with load_script().tracked_positions(model) as held:
        prefill(model, tokens)
    assert sorted(held) == [0, 1]  # both layers
    for positions in held.values():  # 8 empty slots, then the 24 written tokens in arrival order
        assert positions.tolist() == [[-1] * 8 + list(range(24))] * 2


def test_the_held_positions_are_the_kept_tokens():
    """Layer 0 of memory_read=tokens keeps the normed embeddings of its tokens (no short convolution): the memory
    bank must equal attn_norm(embed(tokens[positions])) at the positions reported, which the 6 slots pick among 30."""
    model, tokens = tokens_model(slots=6), torch.randint(0, 256, (3, 30))
    with load_script().tracked_positions(model) as held:
        _, state = prefill(model, tokens)
    positions = held[0]  # [B, M]
    assert (positions >= 0).all() and (positions.diff(dim=1) > 0).all()  # six distinct tokens, arrival order
    with torch.no_grad():
        expected = model.blocks[0].attn_norm(model.embed_tokens(tokens.gather(1, positions)))
    torch.testing.assert_close(state.memory[0], expected)


def test_other_writes_are_refused():
    cfg = TitanConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, memory_slots=4, memory_dim=16,
                      segment_length=8)
    with pytest.raises(ValueError, match="memory_write=select"):
        with load_script().tracked_positions(tiny_model(cfg)):
            pass
