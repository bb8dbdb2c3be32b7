"""scripts/memory_contents.py: the positions it reports are the tokens the tokens memory keeps (through the model's
public write hook)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from support import kind_config, tiny_model

from ltm_core.config import TokensMemoryConfig
from ltm_core.tasks.evaluate import prefill

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_contents.py"


def load_script():
    spec = importlib.util.spec_from_file_location("memory_contents", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokens_model(slots: int, window_parallel: bool = True):
    cfg = kind_config("tokens", segment_length=8, short_conv=0, short_conv_carry=False,
                      memory=TokensMemoryConfig(slots=slots))
    model = tiny_model(cfg, perturb=True).eval()
    model.window_parallel = window_parallel
    return model


def test_with_room_for_every_token_all_positions_are_held_in_order():
    model, tokens = tokens_model(slots=32), torch.randint(0, 256, (2, 28))  # 3 whole segments of 8, 4 pending
    with load_script().tracked_positions(model) as held:
        prefill(model, tokens)
    assert sorted(held) == [0, 1]  # both layers
    for positions in held.values():  # 8 empty slots, then the 24 written tokens in arrival order
        assert positions.tolist() == [[-1] * 8 + list(range(24))] * 2


@pytest.mark.parametrize("window_parallel", [True, False])
def test_the_held_positions_are_the_kept_tokens(window_parallel):
    """Layer 0 of the tokens memory keeps the normed embeddings of its tokens (no short convolution): the memory
    must equal attn_norm(embed(tokens[positions])) at the positions reported, which the 6 slots pick among 30, on
    the layer-major path and segment by segment."""
    model, tokens = tokens_model(slots=6, window_parallel=window_parallel), torch.randint(0, 256, (3, 30))
    with load_script().tracked_positions(model) as held:
        _, state = prefill(model, tokens)
    positions = held[0]  # [B, M]
    assert (positions >= 0).all() and (positions.diff(dim=1) > 0).all()  # six distinct tokens, arrival order
    with torch.no_grad():
        expected = model.blocks[0].attn_norm(model.embed_tokens(tokens.gather(1, positions)))
    torch.testing.assert_close(state.memory[0], expected)


def test_other_kinds_are_refused():
    with pytest.raises(ValueError, match="tokens memory"):
        with load_script().tracked_positions(tiny_model(kind_config("delta"))):
            pass
