"""model.short_conv=K: a causal depthwise convolution over each block's input before self-attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltm_core import TitanConfig
from ltm_core.errors import ConfigError
from support import ids as _ids, spy_cpu_kernels, tiny_model


def _with_conv(cfg: TitanConfig, K: int = 3, **changes):
    """A model with short_conv=K and random (not the zero-initialised) convolution weights."""
    model = tiny_model(dataclasses.replace(cfg, short_conv=K, **changes))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.short_conv.copy_(torch.randn(block.short_conv.shape, generator=torch.Generator().manual_seed(i)))
    return model


def test_the_convolution_is_causal_depthwise_and_carries_its_predecessors(tiny_cfg):
    block = _with_conv(tiny_cfg, K=3).blocks[0]
    w = block.short_conv  # [C, K]
    x = torch.randn(2, 5, tiny_cfg.hidden_size)
    before = torch.randn(2, 2, tiny_cfg.hidden_size)
    y, shift = block._short_conv(x, before)
    seen = torch.cat([before, x], dim=1)  # [B, 2 + 5, C]
    expected = x + sum(w[:, j] * seen[:, j:j + 5] for j in range(3))  # tap K - 1 is the token itself
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(shift, x[:, -2:])
    y0, _ = block._short_conv(x, None)  # the first segment: zeros before it
    torch.testing.assert_close(y0, block._short_conv(x, torch.zeros_like(before))[0])
    _, short = block._short_conv(x[:, :1], before)  # a call shorter than K - 1 keeps the older inputs
    torch.testing.assert_close(short, torch.cat([before[:, 1:], x[:, :1]], dim=1))


@pytest.mark.parametrize("residual", [False, True], ids=["conv", "residual"])
@pytest.mark.parametrize("shape", [(1, 64, 48, 4), (3, 17, 8, 3), (2, 2, 8, 4)], ids=str)  # (B, T, C, K); T < K - 1
def test_the_compiled_convolution_gives_conv1ds_values_and_gradients(shape, residual, monkeypatch):
    """In float32 on CPU `causal_conv` runs as `ltm_core.cpu_kernels`' compiled passes; they give what `conv1d`
    (`model.kernels=torch`, the reference) gives: the output and the gradients of x, the weight and the inputs
    before x; with the residual (x + the convolution, as the blocks use it) too, and from a strided x."""
    from ltm_core.layers import causal_conv

    calls = spy_cpu_kernels(monkeypatch, "causal_conv_forward", "causal_conv_backward")
    B, T, C, K = shape
    g = torch.Generator().manual_seed(0)
    x, weight, before = (torch.randn(*s, generator=g, requires_grad=True) for s in ((T, B, C), (C, K), (B, K - 1, C)))
    dy = torch.randn(B, T, C, generator=g)

    def conv(backend):
        return causal_conv(x.transpose(0, 1), weight, before, backend, residual=residual)

    got, want = ((conv(backend), *torch.autograd.grad(conv(backend), (x, weight, before), dy))
                 for backend in ("auto", "torch"))
    assert calls == ["causal_conv_forward", "causal_conv_forward", "causal_conv_backward"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("windows", [(1, 2, 1), (2, 2), (3,)], ids=str)
def test_a_pass_convolves_its_windows_in_one_compiled_call_with_the_references_gradients(tiny_cfg, windows,
                                                                                        monkeypatch):
    """A layer-major pass over several BPTT windows (`Block._short_conv_window`, carried): on CPU in float32 one
    compiled call over all its tokens (`layers.windowed_conv`), whose backward cuts each window's gradient path to
    the inputs before it; it gives what the reference (`model.kernels=torch`: each window restarted from the last
    inputs of the one before, detached) gives: the output, the carried inputs, and the gradients of x, the weight and
    the inputs before the pass."""
    calls = spy_cpu_kernels(monkeypatch, "causal_conv_forward", "causal_conv_backward")
    model = _with_conv(tiny_cfg, K=4, short_conv_carry=True)
    block = model.blocks[0]
    S, C = 2, tiny_cfg.hidden_size  # segments shorter than K - 1: a window's first token reads two windows back
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, sum(windows), S, C, generator=g, requires_grad=True)
    before = torch.randn(2, 3, C, generator=g, requires_grad=True)
    dy, dtail = torch.randn(x.shape, generator=g), torch.randn(2, 3, C, generator=g)

    def run(kernels):
        block.cfg = dataclasses.replace(block.cfg, kernels=kernels)
        y, tail = block._short_conv_window(x, before, windows)
        grads = torch.autograd.grad((y * dy).sum() + (tail * dtail).sum(), (x, block.short_conv, before))
        return y, tail, *grads

    got, want = run("auto"), run("torch")
    assert calls == ["causal_conv_forward", "causal_conv_backward"]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_compiled_passes_leave_pytorchs_thread_count_as_it_was_and_follow_its_changes():
    """Numba's first parallel launch starts its OpenMP pool, which set the thread count of the runtime PyTorch
    shares (a process at 1 thread went on at 2, so two runs of one training differed bitwise); the compiled passes put
    PyTorch's count back. Numba's own count is set only when PyTorch's changes (`cpu_kernels._launch`), and follows
    every change. In a fresh process, where that first launch happens."""
    import subprocess
    import sys

    code = ("import numba, torch; from ltm_core.layers import causal_conv\n"
            "for n in (1, 2, 1, 2):\n"
            "    torch.set_num_threads(n); causal_conv(torch.randn(1, 8, 4), torch.randn(4, 3), None)\n"
            "    print(torch.get_num_threads(), numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [tuple(map(int, line.split())) for line in out.stdout.splitlines()]
    assert [(torch_n, numba_n) for torch_n, numba_n, _ in rows] == [(n, min(n, cap)) for n, (_, _, cap) in
                                                                    zip((1, 2, 1, 2), rows)]


def test_zero_at_init_so_the_model_starts_as_without_it(tiny_cfg):
    plain = tiny_model(dataclasses.replace(tiny_cfg, short_conv=0, short_conv_carry=False)).eval()
    conv = tiny_model(dataclasses.replace(tiny_cfg, short_conv=4)).eval()
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.short_conv" for i in range(tiny_cfg.num_hidden_layers)]
    ids = _ids(3 * tiny_cfg.segment_length)
    torch.testing.assert_close(conv(ids).logits, plain(ids).logits, rtol=0, atol=0)
    assert conv.num_parameters() - plain.num_parameters() == tiny_cfg.num_hidden_layers * tiny_cfg.hidden_size * 4


@pytest.mark.parametrize("use_memory,carry", [(True, False), (False, False), (True, True)])
def test_causal_and_streaming_equals_one_call(tiny_cfg, use_memory, carry):
    model = _with_conv(tiny_cfg, use_memory=use_memory, short_conv_carry=carry).eval()
    S = tiny_cfg.segment_length
    ids = _ids(5 * S + 3)
    full = model(ids)
    for t in (0, S - 1, 2 * S + 5):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 256
        torch.testing.assert_close(model(changed).logits[:, :t], full.logits[:, :t], rtol=0, atol=0)
    state, pieces, pos = None, [], 0
    for size in (5, 1, 1, 9, 30, 17, 20):  # calls shorter than the kernel, and across segment ends
        out = model(ids[:, pos:pos + size], memory=state)
        pieces.append(out.logits)
        state, pos = out.memory, pos + size
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits[:, :pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("carry", [False, True])
def test_restarts_at_each_segment_so_the_baselines_stay_segment_local(tiny_cfg, carry):
    """Like attention, the convolution sees nothing of an earlier segment: without memory, no change in segment 0
    reaches segment 1 (were it carried over, each layer would pass it one segment further), short_conv_carry or not."""
    S = tiny_cfg.segment_length
    model = _with_conv(tiny_cfg, use_memory=False, short_conv_carry=carry).eval()
    ids = _ids(3 * S)
    base = model(ids).logits
    changed = ids.clone()
    changed[:, S - 1] = (changed[:, S - 1] + 7) % 256  # the last token of segment 0
    logits = model(changed).logits
    assert (logits[:, S - 1] - base[:, S - 1]).abs().amax() > 0
    torch.testing.assert_close(logits[:, S:], base[:, S:], rtol=0, atol=0)


def test_gradients_reach_it_and_bptt_detaches_its_state(tiny_cfg):
    model = _with_conv(tiny_cfg, short_conv_carry=False)
    ids = _ids(3 * tiny_cfg.segment_length)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(block.short_conv.grad.abs().sum() > 0 for block in model.blocks)
    assert all(ls.shift is None for ls in out.memory.layers)  # the segment is complete: the next starts afresh
    out = model(ids[:, :5], labels=ids[:, :5])  # mid-segment: the pending inputs, detached with the state
    assert [tuple(ls.shift.shape) for ls in out.memory.layers] == [(2, 2, tiny_cfg.hidden_size)] * 2
    assert not any(ls.shift.requires_grad for ls in out.memory.detach().layers)


def _convolution_calls(model, ids):
    """Runs the model on ids and records each block's convolution calls: [(block index, x, before)]."""
    calls = []
    for i, block in enumerate(model.blocks):
        def record(x, before, i=i, conv=block._short_conv):
            calls.append((i, x, before))
            return conv(x, before)
        block._short_conv = record
    with torch.no_grad():
        model(ids)
    return calls


@pytest.mark.parametrize("carry", [False, True])
def test_with_carry_a_segment_starts_from_the_last_inputs_of_the_one_before(tiny_cfg, carry):
    """short_conv_carry: each block's convolution at segment s + 1 sees the last K - 1 inputs it had at segment s,
    as one convolution over the whole input would (a key split by a boundary keeps its predecessors); without it,
    zeros."""
    S, K = tiny_cfg.segment_length, 3
    model = _with_conv(tiny_cfg, K=K, short_conv_carry=carry).eval()
    model.window_parallel = False  # segment by segment (the layer-major pass is tested equal to it)
    calls = _convolution_calls(model, _ids(3 * S))
    layers = tiny_cfg.num_hidden_layers
    assert [i for i, _, _ in calls] == list(range(layers)) * 3  # one call per block and segment
    for (i, x, _), (j, _, before) in zip(calls, calls[layers:]):  # segment s's call, then s + 1's of the same block
        assert i == j and x.shape[1] == S
        if carry:
            torch.testing.assert_close(before, x[:, -(K - 1):], rtol=0, atol=0)
        else:
            assert before is None
    assert all(before is None for _, _, before in calls[:layers])  # the first segment: zeros before it


def test_the_carried_inputs_cross_bptt_boundaries_detached(tiny_cfg):
    model = _with_conv(tiny_cfg, short_conv_carry=True)
    ids = _ids(3 * tiny_cfg.segment_length)
    out = model(ids, labels=ids)
    assert [tuple(ls.shift.shape) for ls in out.memory.layers] == [(2, 2, tiny_cfg.hidden_size)] * 2
    assert not any(ls.shift.requires_grad for ls in out.memory.detach().layers)


def test_carry_needs_a_convolution(tiny_cfg):
    with pytest.raises(ConfigError, match="model.short_conv_carry"):
        dataclasses.replace(tiny_cfg, short_conv=0, short_conv_carry=True)


@pytest.mark.parametrize("bad", [1, -2, True, 2.5])
def test_bad_kernel_names_the_key(tiny_cfg, bad):
    with pytest.raises(ConfigError, match="model.short_conv"):
        dataclasses.replace(tiny_cfg, short_conv=bad, short_conv_carry=False)
