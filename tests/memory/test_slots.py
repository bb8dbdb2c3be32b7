"""The slots memory (the seed design): the gated write and the cross-attention read against hand references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltm_core.layers import RMSNorm
from support import ids, kind_config, tiny_model


def test_the_gated_write_is_the_seed_formula():
    """c = W_c norm(h), g = c sigmoid(w . c); new = softmax(Q(mem) K(g)^T / sqrt(D)) V(g);
    u = sigmoid(W_u [mem; new] + b_u); mem = (1 - u) mem + u new."""
    cfg = kind_config("slots")
    memory = tiny_model(cfg, perturb=True).blocks[0].memory
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, cfg.segment_length, cfg.hidden_size, generator=g)
    mem = torch.randn(2, 8, 16, generator=g)
    norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, "torch")
    norm.load_state_dict(memory.norm.state_dict())
    c = memory.compress(norm(h))
    gated = c * torch.sigmoid(memory.importance(c))
    torch.testing.assert_close(memory.entries(h), gated)
    scores = memory.query(mem) @ memory.key(gated).transpose(1, 2) / 16 ** 0.5
    new = scores.softmax(-1) @ memory.value(gated)
    u = torch.sigmoid(memory.update(torch.cat([mem, new], -1)))
    torch.testing.assert_close(memory.write(mem, gated).state, (1 - u) * mem + u * new, rtol=1e-5, atol=1e-6)


def test_the_cross_read_attends_from_the_tokens_to_the_slots():
    cfg = kind_config("slots")
    memory = tiny_model(cfg, perturb=True).blocks[0].memory
    reader, H = memory.reader, cfg.num_attention_heads
    g = torch.Generator().manual_seed(1)
    x, mem = torch.randn(2, 5, cfg.hidden_size, generator=g), torch.randn(2, 8, 16, generator=g)
    h = memory.read_norm(x)
    q = reader.q_proj(h).view(2, 5, H, -1).transpose(1, 2)
    k, v = reader.kv_proj(mem).view(2, 8, 2, H, -1).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(memory.read(x, mem), reader.o_proj(y), rtol=1e-5, atol=1e-6)


def test_initial_memory_and_update_gate_bias():
    cfg = kind_config("slots")
    model = tiny_model(cfg)
    memory = model.blocks[0].memory
    assert torch.equal(memory.update.bias, torch.full_like(memory.update.bias, cfg.memory.update_gate_bias))
    state = model(ids(5)).memory  # inside the first segment: still the learned initial memory
    torch.testing.assert_close(state.layers[0].memory, memory.initial.expand(2, -1, -1), rtol=0, atol=0)
