"""The delta memory: the segment's triangular solve is the token-by-token delta rule; a key written again is
overwritten; it writes the state after self-attention, before its own read."""

from __future__ import annotations

import torch

from ltm_core.layers import rotary_tables
from ltm_core.memory import LayerState
from support import kind_config, tiny_model


def test_the_write_is_the_token_by_token_delta_rule():
    """The one triangular solve equals S sequential updates mem += b_t (v_t - mem k_t) k_t^T, in float64."""
    cfg = kind_config("delta")
    memory = tiny_model(cfg, perturb=True).blocks[0].memory.double()
    g = torch.Generator().manual_seed(0)
    B, S, M, D = 3, 11, 8, 16
    c, mem = torch.randn(B, S, D, generator=g).double(), torch.randn(B, M, D, generator=g).double()
    with torch.no_grad():
        k = torch.nn.functional.normalize(memory.key(c), dim=-1)  # [B, S, D]
        v, b = memory.value(c), torch.sigmoid(memory.importance(c))  # [B, S, M], [B, S, 1]
        expect = mem.clone()
        for t in range(S):
            err = v[:, t] - (expect @ k[:, t].unsqueeze(-1)).squeeze(-1)  # [B, M]
            expect = expect + b[:, t, :, None] * err.unsqueeze(-1) * k[:, t].unsqueeze(1)
        torch.testing.assert_close(memory.write(mem, c).state, expect, rtol=1e-10, atol=1e-10)


def test_a_key_written_again_is_overwritten():
    """Two tokens with the same key and different values, written at full strength: reading the key returns the
    later value exactly (overwrite, not a sum), and a key orthogonal to it reads what the memory held before."""
    cfg = kind_config("delta")
    memory = tiny_model(cfg).blocks[0].memory
    D, half = 16, 8
    with torch.no_grad():  # keys from the first half of c, values from the second
        memory.key.weight.zero_()
        memory.key.weight[:half, :half] = torch.eye(half)
        memory.value.weight[:, :half] = 0
        memory.importance.weight.zero_()
        memory.importance.bias.fill_(30.0)  # b = 1
        a, other = torch.zeros(D), torch.zeros(D)
        a[0], other[1] = 1.0, 1.0
        c = torch.stack([a + torch.cat([torch.zeros(half), torch.randn(half)]) for _ in range(2)])[None]  # [1, 2, D]
        mem = torch.randn(1, 8, D)
        new = memory.write(mem, c).state
        torch.testing.assert_close(new @ a, memory.value(c)[0, 1][None], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new @ other, mem @ other, rtol=1e-5, atol=1e-5)


def test_it_writes_the_state_after_attention_whatever_the_memory_holds():
    """What a segment writes does not depend on the memory it reads (that is what lets a window run layer by
    layer)."""
    cfg = kind_config("delta")
    block = tiny_model(cfg, perturb=True).blocks[0].eval()
    S = cfg.segment_length
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta)
    outs = [block(x, cos, sin, LayerState(torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(s))))
            for s in (1, 2)]
    torch.testing.assert_close(outs[0][3], outs[1][3], rtol=0, atol=0)  # the entries
    assert (outs[0][0] - outs[1][0]).abs().amax() > 1e-4  # the block's output does read the memory


def test_the_exported_write_solves_by_forward_substitution(monkeypatch):
    """Under export (ONNX has no triangular solve) the write takes `unit_lower_solve`: (I + a)^-1 r as the solver
    gives it, also where the powers of a grow (a all ones below the diagonal: (I + a)^-1 is bidiagonal), and the
    same state as the solve."""
    from ltm_core.memory.delta import unit_lower_solve

    g = torch.Generator().manual_seed(0)
    B, S, M = 2, 64, 5
    r = torch.randn(B, S, M, generator=g, dtype=torch.float64)
    eye = torch.eye(S, dtype=torch.float64)
    for a in (torch.randn(B, S, S, generator=g, dtype=torch.float64).tril(-1) * 0.3,
              torch.ones(B, S, S, dtype=torch.float64).tril(-1)):
        expect = torch.linalg.solve_triangular(eye + a, r, upper=False)
        torch.testing.assert_close(unit_lower_solve(a, r), expect, rtol=1e-10, atol=1e-10)
    memory = tiny_model(kind_config("delta"), perturb=True).blocks[0].memory
    c, mem = torch.randn(B, 16, 16, generator=g), torch.randn(B, 8, 16, generator=g)  # [B, S, D], [B, M, D]
    with torch.no_grad():
        solved = memory.write(mem, c).state
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        substituted = memory.write(mem, c).state
    torch.testing.assert_close(substituted, solved, rtol=0, atol=1e-5)
