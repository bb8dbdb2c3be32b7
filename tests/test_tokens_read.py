"""model.memory_read=tokens: the memory keeps whole tokens (their normed self-attention inputs) and the
self-attention reads them through its own key/value projections, beside the segment's keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltm_core import TitanConfig
from ltm_core.errors import ConfigError
from ltm_core.memory import LayerState
from ltm_core.model import rotary_tables
from support import tiny_model


@pytest.fixture
def cfg(tiny_cfg) -> TitanConfig:
    return dataclasses.replace(tiny_cfg, memory_write="select", memory_read="tokens", memory_dim=tiny_cfg.hidden_size)


def _ids(L: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{}, dict(short_conv=3, read_importance=True, memory_slots=24)])
def test_causal_and_streaming_equals_one_call(cfg, extra):
    model = tiny_model(dataclasses.replace(cfg, **extra)).eval()
    S = cfg.segment_length
    ids = _ids(5 * S + 3)
    full = model(ids).logits
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 7) % 256
    logits = model(changed).logits
    torch.testing.assert_close(logits[:, :3], full[:, :3], rtol=0, atol=0)
    assert (logits[:, 3 * S:] - full[:, 3 * S:]).abs().amax() > 0  # segment 0 reaches segment 3 through the memory
    state, pieces, pos = None, [], 0
    for size in (5, 11, 1, 30, 17, 40):
        out = model(ids[:, pos:pos + size], memory=state)
        pieces.append(out.logits)
        state, pos = out.memory, pos + size
    torch.testing.assert_close(torch.cat(pieces, 1), full[:, :pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, dict(read_importance=True)])
def test_the_first_segment_reads_nothing_from_the_empty_memory(cfg, extra):
    """Empty slots are masked out of the read: before any write the model is its no-memory twin, same weights."""
    model = tiny_model(dataclasses.replace(cfg, **extra)).eval()
    twin = tiny_model(dataclasses.replace(cfg, use_memory=False)).eval()
    loaded = twin.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.missing_keys and all(".memory.importance." in k for k in loaded.unexpected_keys)
    ids = _ids(cfg.segment_length)
    torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=1e-6)
    assert model.num_parameters() - twin.num_parameters() == cfg.num_hidden_layers * (cfg.hidden_size + 1)


def test_the_memory_keeps_the_tokens_as_the_attention_sees_them(cfg):
    """Layer 0 after one segment with room for all of it: the remaining empty slots (zeros), then the segment's
    normed embeddings in order (arrival order); the next segment's tokens take the empty slots first."""
    cfg = dataclasses.replace(cfg, memory_slots=cfg.segment_length + 8)
    model = tiny_model(cfg).eval()
    S, block = cfg.segment_length, model.blocks[0]
    ids = _ids(2 * S)
    mem = model(ids[:, :S]).memory.layers[0].memory  # [B, M, C]
    torch.testing.assert_close(mem[:, 8:], block.attn_norm(model.embed_tokens(ids[:, :S])), rtol=0, atol=0)
    assert block.memory.empty(mem)[:, :8].all() and not block.memory.empty(mem)[:, 8:].any()
    mem = model(ids).memory.layers[0].memory
    assert not block.memory.empty(mem).any()


def test_a_kept_token_is_keyed_as_at_segment_position_zero(cfg):
    """The slots carry no position: attn.kv(h) gives the key and value the attention computes for h at segment
    position 0 (where the rotation is the identity)."""
    model = tiny_model(cfg).eval()
    attn, C = model.blocks[0].attn, cfg.hidden_size
    h = torch.randn(3, 1, C)
    cos, sin = rotary_tables(torch.zeros(1, dtype=torch.long), cfg.head_dim, cfg.rope_theta)
    _, k, v = attn(h, cos, sin, LayerState(None), None, "torch")  # [3, H, 1, hd]
    k_mem, v_mem = attn.kv(h.transpose(0, 1))  # one batch row holding three slots: [1, H, 3, hd]
    torch.testing.assert_close(k_mem, k.squeeze(2).transpose(0, 1).unsqueeze(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(v_mem, v.squeeze(2).transpose(0, 1).unsqueeze(0), rtol=0, atol=1e-6)


def test_a_later_segment_attends_to_the_kept_tokens(cfg):
    """Hand reference of layer 0's read: softmax over [W_k mem ; rope(W_k segment)] with the self-attention's own
    projections, the segment part causal."""
    model = tiny_model(cfg).eval()
    S, block, H, hd = cfg.segment_length, model.blocks[0], cfg.num_attention_heads, cfg.head_dim
    ids = _ids(2 * S, B=1)
    mem = model(ids[:, :S]).memory.layers[0].memory[0]  # [M, C]
    h = block.attn_norm(model.embed_tokens(ids[0, S:]))  # [S, C]
    q, k, v = block.attn.qkv_proj(h).view(S, 3, H, hd).permute(1, 2, 0, 3)  # [H, S, hd]
    _, km, vm = block.attn.qkv_proj(mem).view(-1, 3, H, hd).permute(1, 2, 0, 3)  # [H, M, hd]
    cos, sin = rotary_tables(torch.arange(S), hd, cfg.rope_theta)
    rot = lambda x: torch.cat([x[..., :hd // 2] * cos - x[..., hd // 2:] * sin,
                               x[..., hd // 2:] * cos + x[..., :hd // 2] * sin], -1)
    scores = rot(q) @ torch.cat([km, rot(k)], 1).transpose(1, 2) / hd ** 0.5  # [H, S, M + S]
    scores[:, :, km.shape[1]:] = scores[:, :, km.shape[1]:].masked_fill(torch.ones(S, S).triu(1).bool(), -torch.inf)
    y = (scores.softmax(-1) @ torch.cat([vm, v], 1)).transpose(0, 1).reshape(S, -1)  # [S, C]
    expected = block.attn.o_proj(y)
    captured = {}
    block.attn.register_forward_hook(lambda mod, args, out: captured.update(y=out[0]))  # returns None: output kept
    model(ids[:, S:], memory=model(ids[:, :S]).memory)
    torch.testing.assert_close(captured["y"][0], expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_earlier_segment_and_the_ranking(cfg):
    model = tiny_model(dataclasses.replace(cfg, bptt_segments=2))
    S = cfg.segment_length
    ids = _ids(2 * S)
    embeds = []

    def keep(module, args, out):
        out.retain_grad()
        embeds.append(out)

    model.embed_tokens.register_forward_hook(keep)
    labels = torch.full_like(ids, -100)
    labels[:, S:] = ids[:, S:]  # the loss on the second segment only
    model(ids, labels=labels).loss.backward()
    assert embeds[0].grad[:, :S].abs().sum() > 0  # through the kept tokens
    assert model.blocks[0].memory.importance.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides,key", [
    (dict(memory_write="gated"), "model.memory_read"),
    (dict(memory_dim=16), "model.memory_dim"),
    (dict(write_from="attention"), "model.write_from"),
    (dict(memory_conv=2), "model.memory_conv"),
    (dict(slot_positions=True), "model.slot_positions"),
    (dict(memory_heads=1), "model.memory_heads"),
])
def test_config_errors_name_the_key(overrides, key):
    base = dict(hidden_size=32, num_attention_heads=2, memory_dim=32, memory_write="select", memory_read="tokens")
    with pytest.raises(ConfigError) as err:
        TitanConfig(**{**base, **overrides})
    assert err.value.key == key


def test_a_checkpoint_loads_with_the_memory_empty(cfg):
    """load_model builds the model on the meta device and loads the weights: the empty initial memory is no
    weight, so it must not come from uninitialised storage."""
    from ltm_core.checkpoint import load_model

    model = tiny_model(cfg).eval()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": {"model": dataclasses.asdict(cfg)}}}
    loaded = load_model("unused.ckpt", ckpt=ckpt).eval()
    ids = _ids(3 * cfg.segment_length)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
