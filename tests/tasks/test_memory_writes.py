"""The memory write variants added for the long-context tasks (model.memory_write, model.memory_conv[_mix],
model.write_from, model.slot_positions, model.read_importance, model.read_qk_norm, model.importance_relative,
model.importance_zloss, model.importance_detach, model.select_grad, model.select_dedup):
causal, streaming == one call, the select write's retention property and the delta write's rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ltm_core import TitanConfig
from ltm_core.errors import ConfigError
from support import tiny_model

VARIANTS = [dict(memory_write="importance"), dict(memory_write="select"),
            dict(memory_write="select", memory_conv=3, memory_read="context"),
            dict(memory_write="gated", memory_conv=2), dict(memory_write="select", write_from="attention"),
            dict(memory_write="select", slot_positions=True), dict(memory_write="select", read_importance=True),
            dict(memory_write="select", slot_positions=True, slot_order="important", memory_read="context"),
            dict(memory_write="select", read_importance=True, memory_read="context", slot_positions=True),
            dict(memory_write="select", read_qk_norm=True, read_importance=True, slot_positions=True),
            dict(memory_write="select", importance_relative=True, importance_penalty=0.5),
            dict(memory_write="select", importance_penalty=1.0, importance_zloss=0.01, importance_detach=1.0),
            dict(memory_write="select", memory_conv=3, memory_conv_mix="full", slot_positions=True),
            dict(memory_write="select", select_grad="logit", importance_penalty=1.0, importance_detach=1.0),
            dict(memory_write="select", select_dedup=0.97, memory_conv=3, slot_positions=True),
            dict(memory_write="delta"), dict(memory_write="delta", write_from="attention", memory_conv=2)]


def _ids(L: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_and_streaming_equals_one_call(tiny_cfg, variant):
    model = tiny_model(dataclasses.replace(tiny_cfg, **variant)).eval()
    S = tiny_cfg.segment_length
    ids = _ids(5 * S + 3)
    full = model(ids)
    for t in (0, S - 1, S, 2 * S + 5):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 256
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], full.logits[:, :t], rtol=0, atol=0)
    assert (model(changed).logits[:, 3 * S:] - full.logits[:, 3 * S:]).abs().amax() > 0  # memory carries it
    state, pieces, pos = None, [], 0
    for size in (5, 11, 1, 30, 17, 40):
        out = model(ids[:, pos:pos + size], memory=state)
        pieces.append(out.logits)
        state, pos = out.memory, pos + size
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits[:, :pos], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_the_write(tiny_cfg, variant):
    model = tiny_model(dataclasses.replace(tiny_cfg, **variant))
    ids = _ids(3 * tiny_cfg.segment_length)
    model(ids, labels=ids).loss.backward()
    memory = model.blocks[0].memory
    assert memory.compress.weight.grad.abs().sum() > 0
    assert memory.importance.weight.grad.abs().sum() > 0
    if variant.get("memory_conv"):
        assert memory.conv.grad.abs().sum() > 0


@torch.no_grad()
def _importance_is_first_channel(memory) -> None:
    """Set a select memory's importance w_s . x to x[0]."""
    memory.importance.weight.zero_()
    memory.importance.weight[0, 0] = 1.0
    memory.importance.bias.zero_()


def test_select_keeps_the_most_important_entries_whatever_follows(tiny_cfg):
    """Entries more important than everything that arrives later stay in memory, bit for bit (evaluation: the
    ranking has no noise)."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select")
    memory = tiny_model(cfg).blocks[0].memory.eval()
    M, D, S = cfg.memory_slots, cfg.memory_dim, cfg.segment_length
    _importance_is_first_channel(memory)
    needle = torch.randn(1, S, D)
    needle[..., 0] = torch.linspace(-1, 1, S)
    needle[0, :3, 0] = 10.0  # three important tokens
    mem = memory.write(memory.initial_state(1), needle, first=True)
    assert not torch.isin(memory.initial_state(1)[0, :1], mem).any()  # the first write replaces the initial memory
    kept = mem[0, torch.isin(mem[0, :, 0], needle[0, :3, 0])]
    torch.testing.assert_close(kept, needle[0, :3], rtol=0, atol=0)
    for i in range(50):  # many segments of filler, all less important
        filler = torch.randn(1, S, D, generator=torch.Generator().manual_seed(i)).clamp(-3, 3)
        mem = memory.write(mem, filler)
    assert mem.shape == (1, M, D)
    for row in needle[0, :3]:
        assert (mem[0] == row).all(-1).any()


@pytest.mark.parametrize("dedup", [None, 0.97])
def test_select_dedup_keeps_a_needle_against_any_number_of_copies_of_a_stronger_token(tiny_cfg, dedup):
    """A periodic haystack repeats its best-ranked filler token: without select_dedup, M copies of it, each more
    important than the needle's weaker tokens, push those out; with it, the copies after the first rank below
    every distinct entry, so the memory holds one copy and keeps the whole needle, bit for bit."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_dedup=dedup)
    memory = tiny_model(cfg).blocks[0].memory.eval()
    M, D, S = cfg.memory_slots, cfg.memory_dim, cfg.segment_length
    _importance_is_first_channel(memory)
    g = torch.Generator().manual_seed(0)
    needle = torch.randn(1, S, D, generator=g).clamp(-3, 3)
    needle[0, :4, 0] = torch.tensor([9.0, 8.0, 5.0, 4.0])  # two strong tokens, two weak ones
    mem = memory.write(memory.initial_state(1), needle, first=True)
    strong = torch.randn(D, generator=g)
    strong[0] = 6.0  # the filler's best token: above the needle's weak tokens
    for i in range(3 * M // 2):  # segments of filler, each with one copy of the strong token (slightly perturbed)
        filler = torch.randn(1, S, D, generator=g).clamp(-3, 3)
        filler[0, i % S] = strong + 1e-4 * torch.randn(D, generator=g)
        mem = memory.write(mem, filler)
    held = [bool((mem[0] == row).all(-1).any()) for row in needle[0, :4]]
    copies = int((F.cosine_similarity(mem[0], strong.expand(M, D), dim=-1) > 0.99).sum())
    if dedup is None:
        assert held == [True, True, False, False] and copies == M - 2  # the copies took every other slot
    else:
        assert held == [True, True, True, True] and copies == 1


def test_select_dedup_ranks_duplicates_after_every_distinct_candidate(tiny_cfg):
    """Fast NMS on the ranking: a candidate similar (cosine > select_dedup) to a higher-ranked one moves below every
    distinct candidate; of exact copies (equal importance) the earliest stays."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_dedup=0.97)
    memory = tiny_model(cfg).blocks[0].memory.eval()
    M, S, D = cfg.memory_slots, cfg.segment_length, cfg.memory_dim
    n = M + S
    _importance_is_first_channel(memory)
    candidates = 5 * torch.randn(1, n, D, generator=torch.Generator().manual_seed(0))  # distinct directions
    candidates[0, :, 0] = torch.linspace(0, 3, n)  # importance rising with the index
    candidates[0, -4:] = candidates[0, -5]  # the last five: one token five times
    candidates[0, :, 1] = torch.arange(n) * 1e-3  # the index, to read back which were kept (cosine unchanged)
    moved = memory._suppress_duplicates(candidates, memory.importance(candidates).squeeze(-1))
    first_copy = n - 5
    kept = list(range(first_copy - (M - 1), first_copy + 1))  # the earliest copy, then the next distinct ones
    assert moved.topk(M, dim=1).indices.sort(dim=1).values[0].tolist() == kept
    out = memory.write(candidates[:, :M], candidates[:, M:])
    assert (out[0, :, 1] * 1e3).round().long().tolist() == kept
    plain = dataclasses.replace(cfg, select_dedup=None)
    memory_plain = tiny_model(plain).blocks[0].memory.eval()
    memory_plain.load_state_dict(memory.state_dict())
    out = memory_plain.write(candidates[:, :M], candidates[:, M:])  # without it: the copies fill five slots
    assert (out[0, :, 1] * 1e3).round().long().tolist() == list(range(n - M, n))


def _ranked_memory(tiny_cfg, noise: float):
    """A select memory whose importance is a token's first channel; candidates 0..M+S-1 of rising importance."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=noise)
    memory = tiny_model(cfg).blocks[0].memory
    M, S, D = cfg.memory_slots, cfg.segment_length, cfg.memory_dim
    _importance_is_first_channel(memory)
    tokens = torch.zeros(1, M + S, D)
    tokens[0, :, 0] = torch.linspace(0, 3, M + S)  # importance rises with the index, 3 apart end to end
    tokens[0, :, 1] = torch.arange(M + S).float()  # the index, to read back which were kept
    return memory, tokens[:, :M], tokens[:, M:]


def test_select_noise_samples_in_training_and_ranks_exactly_in_evaluation(tiny_cfg):
    """Training ranks importance + select_noise * Gumbel (Gumbel-top-k sampling): less important entries are
    sometimes kept, the more important ones more often; evaluation, and select_noise=0, keep the exact top M."""
    memory, mem, segment = _ranked_memory(tiny_cfg, noise=1.0)
    M, n = mem.shape[1], mem.shape[1] + segment.shape[1]
    top = list(range(n - M, n))
    memory.eval()
    assert memory.write(mem, segment)[0, :, 1].round().long().tolist() == top
    memory.train()
    torch.manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(300):
        kept = memory.write(mem, segment)[0, :, 1].round().long()
        assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == M  # arrival order, no repeats
        counts[kept] += 1
    assert counts[:n - M].sum() > 0 and counts[n - M:].sum() < 300 * M  # sampled, not the exact top M
    assert counts[n - M:].sum() > counts[:M].sum() * 3  # the most important M kept far more often than the least
    exact, mem0, segment0 = _ranked_memory(tiny_cfg, noise=0.0)
    assert exact.train().write(mem0, segment0)[0, :, 1].round().long().tolist() == top


def test_select_has_no_write_attention_parameters(tiny_cfg):
    names = {n for n, _ in tiny_model(dataclasses.replace(tiny_cfg, memory_write="select")).named_parameters()}
    assert "blocks.0.memory.importance.weight" in names and "blocks.0.memory.compress.weight" in names
    assert not any(n.split(".")[3] in ("query", "key", "value", "update") for n in names if ".memory." in n)


def test_importance_penalty_adds_its_gradient_in_training_only(tiny_cfg):
    """importance_penalty = lambda: the write's backward adds the gradient of lambda * mean sigmoid(w_s . c) over
    the segment's tokens to what the reads give; evaluation, and no grad mode, are unchanged."""
    lam = 0.7
    g = torch.Generator().manual_seed(0)
    base = tiny_model(dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0)).blocks[0].memory
    pen = tiny_model(dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0,
                                         importance_penalty=lam)).blocks[0].memory
    pen.load_state_dict(base.state_dict())
    mem = torch.randn(2, tiny_cfg.memory_slots, tiny_cfg.memory_dim, generator=g)
    c = torch.randn(2, tiny_cfg.segment_length, tiny_cfg.memory_dim, generator=g)
    r = torch.randn(2, tiny_cfg.memory_slots, tiny_cfg.memory_dim, generator=g)
    grads = []
    for module in (base, pen):
        module.train().zero_grad()
        out = module.write(mem, c)
        (out * r).sum().backward()
        grads.append((out.detach(), module.importance.weight.grad.clone(), module.importance.bias.grad.clone()))
    base.zero_grad()
    (lam * torch.sigmoid(base.importance(c)).mean()).backward()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)  # the write itself is unchanged
    torch.testing.assert_close(grads[1][1], grads[0][1] + base.importance.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][2], grads[0][2] + base.importance.bias.grad, rtol=1e-5, atol=1e-6)
    assert base.importance.weight.grad.abs().sum() > 0
    pen.eval().zero_grad()
    (pen.write(mem, c) * r).sum().backward()
    base.eval().zero_grad()
    (base.write(mem, c) * r).sum().backward()
    torch.testing.assert_close(pen.importance.weight.grad, base.importance.weight.grad, rtol=0, atol=0)


def test_importance_zloss_adds_the_mean_squared_importance(tiny_cfg):
    """importance_zloss = lambda_z: the write's backward adds the gradient of lambda_z * mean (w_s . c)^2 over the
    segment's tokens to what the reads and the penalty give; the write itself is unchanged."""
    g = torch.Generator().manual_seed(3)
    M, D, S = tiny_cfg.memory_slots, tiny_cfg.memory_dim, tiny_cfg.segment_length
    mem, c, r = torch.randn(2, M, D, generator=g), torch.randn(2, S, D, generator=g), torch.randn(2, M, D, generator=g)
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0, importance_penalty=0.3)
    base = tiny_model(cfg).blocks[0].memory.train()
    zl = tiny_model(dataclasses.replace(cfg, importance_zloss=0.05)).blocks[0].memory.train()
    zl.load_state_dict(base.state_dict())
    outs = []
    for module in (base, zl):
        out = module.write(mem, c)
        (out * r).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    alone = tiny_model(cfg).blocks[0].memory
    alone.load_state_dict(base.state_dict())
    (0.05 * alone.importance(c).square().mean()).backward()  # the z-loss by hand
    for name in ("weight", "bias"):
        extra = getattr(alone.importance, name).grad
        assert extra.abs().amax() > 1e-4
        torch.testing.assert_close(getattr(zl.importance, name).grad, getattr(base.importance, name).grad + extra,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_importance_detach_trains_the_importance_weights_only(tiny_cfg, relative):
    """importance_detach = a: the penalty and the z-loss give the importance weights the same gradient as without
    it, and what the entries hold (c, mem) the share 1 - a of theirs: at a = 1 the gradient without them."""
    g = torch.Generator().manual_seed(4)
    M, D, S = tiny_cfg.memory_slots, tiny_cfg.memory_dim, tiny_cfg.segment_length
    mem0, c0, r = (torch.randn(2, M, D, generator=g), torch.randn(2, S, D, generator=g),
                   torch.randn(2, M, D, generator=g))

    def run(**knobs):
        cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0, importance_relative=relative,
                                  **knobs)
        memory = tiny_model(cfg).blocks[0].memory.train()
        mem, c = mem0.clone().requires_grad_(), c0.clone().requires_grad_()
        (memory.write(mem, c) * r).sum().backward()
        return memory.importance.weight.grad.clone(), mem.grad, c.grad

    aux = dict(importance_penalty=0.7, importance_zloss=0.1)
    w_plain, mem_plain, c_plain = run()
    w_aux, mem_aux, c_aux = run(**aux)
    w_det, mem_det, c_det = run(importance_detach=1.0, **aux)
    w_half, mem_half, c_half = run(importance_detach=0.25, **aux)  # 3/4 of the extra gradient reaches c
    torch.testing.assert_close(w_det, w_aux, rtol=1e-4, atol=1e-6)  # the importance weights learn the same
    torch.testing.assert_close(c_det, c_plain, rtol=1e-4, atol=1e-6)  # the tokens get only the reads' gradient
    torch.testing.assert_close(mem_det, mem_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_half, w_aux, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_half, c_plain + 0.75 * (c_aux - c_plain), rtol=1e-4, atol=1e-6)
    assert (c_aux - c_plain).abs().amax() > 1e-4  # without detach the penalty reaches them
    assert (w_aux - w_plain).abs().amax() > 1e-4


def test_importance_relative_learns_the_ranking_whatever_the_shift(tiny_cfg):
    """importance_relative: the write keeps the same entries with the same values, and the gradient that the
    reads and the penalty give the importance weights depends on the ranking only: shifting every importance by
    -30 (the bias) leaves it as it was, where the absolute sigmoid's gradient vanishes. The factor and the penalty
    are sigmoid(w_s . x - t), t the M-th highest importance among the candidates."""
    g = torch.Generator().manual_seed(0)
    M, D, S = tiny_cfg.memory_slots, tiny_cfg.memory_dim, tiny_cfg.segment_length
    mem, c, r = torch.randn(2, M, D, generator=g), torch.randn(2, S, D, generator=g), torch.randn(2, M, D, generator=g)

    def run(relative: bool, shift: float):
        cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0, importance_penalty=0.7,
                                  importance_relative=relative)
        memory = tiny_model(cfg).blocks[0].memory.train()
        with torch.no_grad():
            memory.importance.bias.add_(shift)
        out = memory.write(mem, c)
        (out * r).sum().backward()
        return out.detach(), memory.importance.weight.grad.clone(), memory

    out_abs, grad_abs, _ = run(False, 0.0)
    out_rel, grad_rel, memory = run(True, 0.0)
    torch.testing.assert_close(out_rel, out_abs, rtol=0, atol=1e-6)  # 1 + s - s: 1 up to rounding
    out_shifted, grad_shifted, _ = run(True, -30.0)
    torch.testing.assert_close(out_shifted, out_rel, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_shifted, grad_rel, rtol=1e-4, atol=1e-6)
    assert grad_rel.abs().amax() > 0
    assert run(False, -30.0)[1].abs().amax() < 1e-6 * grad_abs.abs().amax()  # absolute: saturated, nothing learns
    # the factor and the penalty by hand: sigmoid(z - t) with t the M-th highest importance (differentiated)
    memory.zero_grad()
    z = memory.importance(torch.cat([mem, c], 1)).squeeze(-1)  # [B, M + S]
    z = z - z.topk(M, dim=1).values[:, -1:]
    keep = z.detach().topk(M, dim=1).indices.sort(dim=1).values
    kept = torch.cat([mem, c], 1).gather(1, keep.unsqueeze(-1).expand(-1, -1, D))
    sg = torch.sigmoid(z.gather(1, keep)).unsqueeze(-1)
    ((kept * (1 + sg - sg.detach()) * r).sum() + 0.7 * torch.sigmoid(z[:, M:]).mean()).backward()
    torch.testing.assert_close(memory.importance.weight.grad, grad_rel, rtol=1e-4, atol=1e-6)
    assert memory.importance.bias.grad.abs().amax() < 1e-6  # a common shift is invisible to it


def test_select_grad_logit_teaches_the_ranking_however_low_the_importances(tiny_cfg):
    """select_grad=logit: the write keeps the same entries with the same values, the kept entries' factor is
    1 + z - z.detach() with z = w_s . entry (the entry held fixed), so the gradient the reads give the importance
    weights is sum <dL/dkept, kept> d z / d w_s: shifting every importance by -30 leaves it as it was, where the
    sigmoid's vanishes; and the entries get only the gradient of their values, none through z."""
    g = torch.Generator().manual_seed(0)
    M, D, S = tiny_cfg.memory_slots, tiny_cfg.memory_dim, tiny_cfg.segment_length
    mem, c, r = torch.randn(2, M, D, generator=g), torch.randn(2, S, D, generator=g), torch.randn(2, M, D, generator=g)

    def run(grad: str, shift: float):
        cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0, select_grad=grad)
        memory = tiny_model(cfg).blocks[0].memory.train()
        with torch.no_grad():
            memory.importance.bias.add_(shift)
        run.c = c.clone().requires_grad_()
        out = memory.write(mem, run.c)
        (out * r).sum().backward()
        return out.detach(), memory.importance.weight.grad.clone(), memory

    out_sig, grad_sig, _ = run("sigmoid", 0.0)
    assert run.c.grad.abs().amax() > 0
    out_logit, grad_logit, memory = run("logit", 0.0)
    torch.testing.assert_close(out_logit, out_sig, rtol=0, atol=1e-6)  # the same entries, values unchanged
    cand = torch.cat([mem, c], 1)  # [B, M + S, D]
    keep = memory.importance(cand).squeeze(-1).detach().topk(M, dim=1).indices.sort(dim=1).values  # [B, M]
    values_only = torch.zeros(2, M + S, D).scatter(1, keep.unsqueeze(-1).expand(-1, -1, D), r)[:, M:]
    torch.testing.assert_close(run.c.grad, values_only, rtol=0, atol=1e-6)  # nothing through z reaches c
    out_low, grad_low, _ = run("logit", -30.0)
    torch.testing.assert_close(out_low, out_logit, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_low, grad_logit, rtol=1e-5, atol=1e-6)
    assert run("sigmoid", -30.0)[1].abs().amax() < 1e-6 * grad_logit.abs().amax()  # the sigmoid's has faded
    assert not torch.allclose(grad_logit, grad_sig)
    # by hand: the factor 1 + z - z.detach() on the kept entries
    memory.zero_grad()
    z = memory.importance(cand).squeeze(-1)  # [B, M + S]
    kept = cand.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))
    zk = z.gather(1, keep).unsqueeze(-1)  # [B, M, 1]
    (kept * (1 + zk - zk.detach()) * r).sum().backward()
    torch.testing.assert_close(memory.importance.weight.grad, grad_logit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [3, 12])
def test_importance_relative_first_write_thresholds_among_the_segment(tiny_cfg, tokens):
    """On the first write the initial entries only fill the slots the segment leaves free, so t is the M-th
    highest among the segment's tokens, or, with fewer tokens than slots, the best initial entry kept: the factor of
    every other kept entry then still carries a gradient to the importance."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", select_noise=0.0, importance_relative=True)
    memory = tiny_model(cfg).blocks[0].memory.train()
    M, D = cfg.memory_slots, cfg.memory_dim
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(2, tokens, D, generator=g), torch.randn(2, M, D, generator=g)
    mem = memory.initial.detach().expand(2, -1, -1)
    (memory.write(mem, c, first=True) * r).sum().backward()
    got = memory.importance.weight.grad.clone()
    memory.zero_grad()
    cand = torch.cat([mem, c], 1)  # [B, M + S, D]
    z = memory.importance(cand).squeeze(-1)  # [B, M + S]
    order = torch.cat([z[:, :M] - 1e4, z[:, M:]], 1).detach()  # segment tokens first, then the best initial ones
    keep = order.topk(M, dim=1).indices  # [B, M], the M-th last
    z = z - z.gather(1, keep[:, -1:])
    keep = keep.sort(dim=1).values
    sg = torch.sigmoid(z.gather(1, keep)).unsqueeze(-1)
    (cand.gather(1, keep.unsqueeze(-1).expand(-1, -1, D)) * (1 + sg - sg.detach()) * r).sum().backward()
    torch.testing.assert_close(got, memory.importance.weight.grad, rtol=1e-4, atol=1e-6)
    assert got.abs().amax() > 0


@pytest.mark.parametrize("key, value", [("memory_write", "sparse"), ("memory_conv", -1), ("select_noise", -0.5),
                                        ("importance_penalty", -1.0), ("importance_penalty", 0.5),
                                        ("importance_zloss", -0.1), ("importance_zloss", 0.1),
                                        ("importance_detach", 0.5), ("importance_detach", 1.5),
                                        ("write_from", "ffn"), ("read_importance", True), ("slot_order", "newest"),
                                        ("slot_order", "important"), ("memory_conv_mix", "grouped"),
                                        ("importance_relative", True), ("memory_conv_mix", "full"),
                                        ("select_grad", "logit"), ("select_dedup", 0.9)])
def test_new_knobs_are_validated(key, value):
    with pytest.raises(ConfigError) as err:
        TitanConfig(**{key: value})
    assert err.value.key == f"model.{key}"


@pytest.mark.parametrize("overrides", [dict(read_importance=True), dict(slot_positions=True, slot_order="important")])
def test_importance_relative_excludes_the_options_that_read_the_absolute_importance(overrides):
    with pytest.raises(ConfigError) as err:
        TitanConfig(memory_write="select", importance_relative=True, **overrides)
    assert err.value.key == "model.importance_relative"


@pytest.mark.parametrize("value", [0, 1.5, True, "x"])
def test_select_dedup_is_a_cosine(value):
    with pytest.raises(ConfigError) as err:
        TitanConfig(memory_write="select", select_dedup=value)
    assert err.value.key == "model.select_dedup"


@pytest.mark.parametrize("value", ["tanh", "logit"])
def test_select_grad_is_validated(value):
    """An unknown factor, or the logit factor with importance_relative's (which it replaces)."""
    with pytest.raises(ConfigError) as err:
        TitanConfig(memory_write="select", select_grad=value, importance_relative=value == "logit")
    assert err.value.key == "model.select_grad"


@pytest.mark.parametrize("overrides", [dict(memory_read="context"), dict(memory_write="delta"),
                                       dict(use_memory=False)])
def test_read_qk_norm_needs_the_cross_attention_read(overrides):
    with pytest.raises(ConfigError) as err:
        TitanConfig(read_qk_norm=True, **overrides)
    assert err.value.key == "model.read_qk_norm"


def test_read_qk_norm_scores_are_scaled_cosines(tiny_cfg):
    """read_qk_norm: each head's read score is sqrt(hd) times the gain-weighted cosine of query and key (gains 1
    at init), so scaling the memory entries leaves the read unchanged (without the norm it does not), and the gains
    learn."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", read_qk_norm=True)
    read = tiny_model(cfg).blocks[0].memory_read.eval()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, cfg.hidden_size, generator=g)
    mem = torch.randn(2, cfg.memory_slots, cfg.memory_dim, generator=g)
    with torch.no_grad():
        read.q_norm.weight.uniform_(0.5, 1.5, generator=g)
        read.k_norm.weight.uniform_(0.5, 1.5, generator=g)
        read.q_proj.weight.mul_(30)  # queries and keys well above the norm's eps
        read.kv_proj.weight.mul_(30)
        H, hd = read.heads, read.head_dim
        q = read.q_proj(h).view(2, 5, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k, v = read.kv(mem)  # [B, H, M, hd]
        eps = cfg.norm_eps  # RMSNorm: x / sqrt(mean x^2 + eps) * gain, ~ sqrt(hd) * x / |x| * gain
        q = q * (q.square().mean(-1, keepdim=True) + eps).rsqrt() * read.q_norm.weight
        k = k * (k.square().mean(-1, keepdim=True) + eps).rsqrt() * read.k_norm.weight
        p = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, dim=-1)  # [B, H, T, M]
        want = read.o_proj((p @ v).transpose(1, 2).reshape(2, 5, -1))
        torch.testing.assert_close(read(h, mem, backend="torch"), want, rtol=1e-5, atol=1e-7)
        # keys are scale-free: 10x entries scale only the values (10x the output)
        torch.testing.assert_close(read(h, 10 * mem, backend="torch"), 10 * want, rtol=1e-3, atol=1e-6)
    plain = tiny_model(dataclasses.replace(cfg, read_qk_norm=False)).blocks[0].memory_read.eval()
    with torch.no_grad():
        assert (plain(h, 10 * mem, backend="torch") - 10 * plain(h, mem, backend="torch")).abs().amax() > 1e-3
    read.train()
    read(h, mem, backend="torch").square().sum().backward()
    assert read.q_norm.weight.grad.abs().amax() > 0 and read.k_norm.weight.grad.abs().amax() > 0


@pytest.mark.parametrize("key, value", [("memory_read", "context"), ("slot_positions", True),
                                        ("read_importance", True)])
def test_delta_rejects_the_slot_options(key, value):
    with pytest.raises(ConfigError) as err:
        TitanConfig(memory_write="delta", **{key: value})
    assert err.value.key == f"model.{key}"


def test_delta_write_is_the_token_by_token_delta_rule(tiny_cfg):
    """The one triangular solve equals T sequential updates mem += b_t (v_t - mem k_t) k_t^T, and the read maps a
    normalised query through the memory."""
    torch.manual_seed(0)
    memory = tiny_model(dataclasses.replace(tiny_cfg, memory_write="delta")).blocks[0].memory
    B, T, M, D = 3, 11, tiny_cfg.memory_slots, tiny_cfg.memory_dim
    c, mem = torch.randn(B, T, D), torch.randn(B, M, D)
    with torch.no_grad():
        memory.importance.bias.fill_(0.5)
        k = torch.nn.functional.normalize(memory.key(c), dim=-1)  # [B, T, D]
        v, b = memory.value(c), torch.sigmoid(memory.importance(c))  # [B, T, M], [B, T, 1]
        expect = mem.clone()
        for t in range(T):
            err = v[:, t] - (expect @ k[:, t].unsqueeze(-1)).squeeze(-1)  # [B, M]
            expect = expect + b[:, t, :, None] * err.unsqueeze(-1) * k[:, t].unsqueeze(1)
        torch.testing.assert_close(memory.write(mem, c), expect, rtol=1e-5, atol=1e-5)


def test_delta_overwrites_a_key_written_again(tiny_cfg):
    """Two tokens with the same key and different values, written at full strength: reading the key returns the
    later value exactly (overwrite, not a sum), and a key orthogonal to it reads what the memory held before."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="delta")
    memory = tiny_model(cfg).blocks[0].memory
    D, half = cfg.memory_dim, cfg.memory_dim // 2
    with torch.no_grad():  # keys from the first half of c, values from the second
        memory.key.weight.zero_()
        memory.key.weight[:half, :half] = torch.eye(half)
        memory.value.weight[:, :half] = 0
        memory.importance.weight.zero_()
        memory.importance.bias.fill_(30.0)  # b = 1
        a, other = torch.zeros(D), torch.zeros(D)
        a[0], other[1] = 1.0, 1.0
        c = torch.stack([a + torch.cat([torch.zeros(half), torch.randn(half)]) for _ in range(2)])[None]  # [1, 2, D]
        mem = torch.randn(1, cfg.memory_slots, D)
        new = memory.write(mem, c)
        torch.testing.assert_close(new @ a, memory.value(c)[0, 1][None], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new @ other, mem @ other, rtol=1e-5, atol=1e-5)


def test_delta_conv_stores_a_token_under_its_predecessor(tiny_cfg):
    """memory_write=delta with memory_conv: the convolution shifts the keys only. With the kernel set to a pure
    shift, the token after `a` is stored under a's key with its own value: reading a's key returns it, and the
    token's own key reads only what it shares with a's (the map started empty)."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="delta", memory_conv=2)
    memory = tiny_model(cfg).blocks[0].memory
    D = cfg.memory_dim
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        memory.conv.zero_()
        memory.conv[:, :, 0] = 1.0  # k_t = K c_{t-1}
        memory.importance.weight.zero_()
        memory.importance.bias.fill_(30.0)  # b = 1
        a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
        c = torch.stack([a, b])[None]  # [1, 2, D]: the first token's key is zero (nothing precedes it)
        new = memory.write(torch.zeros(1, cfg.memory_slots, D), c)
        key_a = torch.nn.functional.normalize(memory.key(a), dim=-1)
        key_b = torch.nn.functional.normalize(memory.key(b), dim=-1)
        torch.testing.assert_close(new[0] @ key_a, memory.value(b), rtol=1e-4, atol=1e-5)
        expect_b = (key_b @ key_a) * memory.value(b)  # only what a's key shares with b's
        torch.testing.assert_close(new[0] @ key_b, expect_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("write_from", ["block", "attention"])
def test_write_from_attention_makes_the_first_layers_writes_independent_of_the_memory(tiny_cfg, write_from):
    """write_from=attention compresses the state before the memory read: the first layer writes the same content
    whatever its memory holds (write_from=block: the read's output is part of what is written)."""
    from ltm_core.memory import LayerState
    from ltm_core.model import rotary_tables

    cfg = dataclasses.replace(tiny_cfg, memory_write="select", write_from=write_from)
    block = tiny_model(cfg).blocks[0].eval()
    S, M, D = cfg.segment_length, cfg.memory_slots, cfg.memory_dim
    x = torch.randn(1, S, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta)
    written = [block(x, cos, sin, LayerState(torch.randn(1, M, D, generator=torch.Generator().manual_seed(s))))[3]
               for s in (1, 2)]
    if write_from == "attention":
        torch.testing.assert_close(written[0], written[1], rtol=0, atol=0)
    else:
        assert (written[0] - written[1]).abs().amax() > 1e-4


@pytest.mark.parametrize("read", ["cross", "context"])
def test_slot_positions_tell_the_read_where_an_entry_sits(tiny_cfg, read):
    """Without slot_positions the read is blind to slot order (a permutation of the slots changes nothing); with a
    trained slot embedding the same entries in another order read differently. At init the embedding is zero:
    the model computes exactly what it computes without it."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", memory_read=read)
    plain, positioned = tiny_model(cfg).eval(), tiny_model(dataclasses.replace(cfg, slot_positions=True)).eval()
    missing, unexpected = positioned.load_state_dict(plain.state_dict(), strict=False)
    assert missing == [f"blocks.{i}.memory_read.slot_embedding" for i in range(cfg.num_hidden_layers)]
    assert not unexpected
    ids = _ids(3 * cfg.segment_length + 5)
    torch.testing.assert_close(positioned(ids).logits, plain(ids).logits, rtol=0, atol=0)
    mem = torch.randn(2, cfg.memory_slots, cfg.memory_dim, generator=torch.Generator().manual_seed(3))
    flipped = mem.flip(1)

    def read_out(model, m):  # the keys and values the read sees, as a set: sorted over the slots
        return torch.cat(model.blocks[0].memory_read.kv(m), dim=-1).sort(dim=2).values
    torch.testing.assert_close(read_out(plain, mem), read_out(plain, flipped), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for block in positioned.blocks:
            block.memory_read.slot_embedding.normal_(generator=torch.Generator().manual_seed(5))
    seen = read_out(positioned, mem)
    assert (seen - read_out(positioned, flipped)).abs().amax() > 0.1 * seen.abs().amax()
    ids_grad = _ids(3 * cfg.segment_length)
    positioned.train()(ids_grad, labels=ids_grad).loss.backward()
    assert positioned.blocks[0].memory_read.slot_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("read", ["cross", "context"])
def test_slot_order_important_ignores_unimportant_entries_before_a_needle(tiny_cfg, read):
    """slot_order=important: an entry's place is its rank among the important entries (w_s . entry > 0), so
    unimportant entries kept before or between the needle's entries leave the needle's keys and values as they
    were; with slot_order=arrival the same entries read differently once moved. The unimportant share one vector."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", memory_read=read, slot_positions=True)
    M, D = cfg.memory_slots, cfg.memory_dim
    g = torch.Generator().manual_seed(0)
    needle, filler = torch.randn(3, D, generator=g), torch.randn(M - 3, D, generator=g)
    needle[:, 0], filler[:, 0] = 1.0, -1.0  # the importance below reads coordinate 0
    early = torch.cat([needle, filler])[None]  # [1, M, D]: the needle first
    late = torch.cat([filler[:2], needle[:1], filler[2:4], needle[1:], filler[4:]])[None]  # filler before, between
    at = [2, 5, 6]  # where the needle's entries sit in `late`
    for order, same in (("important", True), ("arrival", False)):
        block = tiny_model(dataclasses.replace(cfg, slot_order=order)).blocks[0]
        with torch.no_grad():
            block.memory.importance.weight.zero_()
            block.memory.importance.weight[0, 0] = 5.0
            block.memory_read.slot_embedding.normal_(generator=g)
        assert block.memory.important(late)[0].tolist() == [i in at for i in range(M)]
        important = (lambda m: block.memory.important(m)) if order == "important" else (lambda m: None)
        k1, v1 = block.memory_read.kv(early, important(early))
        k2, v2 = block.memory_read.kv(late, important(late))
        moved = (k1[:, :, :3] - k2[:, :, at]).abs().amax()
        if same:
            torch.testing.assert_close(k2[:, :, at], k1[:, :, :3], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v2[:, :, at], v1[:, :, :3], rtol=1e-6, atol=1e-6)
            assert block.memory_read.slot_embedding.shape[0] == M + 1
            torch.testing.assert_close(k2[:, :, 0], k1[:, :, 3], rtol=1e-6, atol=1e-6)  # filler[0]: one shared vector
        else:
            assert moved > 1e-3


@pytest.mark.parametrize("causal, prefix", [(False, 6), (True, 4)])
def test_key_bias_folded_into_the_head_dim_equals_an_additive_mask(causal, prefix):
    """with_key_bias: softmax(q.k / sqrt(hd) + bias) through the one attention dispatch, for the memory read
    (cross: every key biased) and memory-as-context (causal segment after a biased prefix)."""
    import torch.nn.functional as F

    from ltm_core.attention import attention, attention_mask, with_key_bias

    g = torch.Generator().manual_seed(0)
    B, H, Lq, hd = 2, 3, 5, 8
    Lk = prefix + (Lq + 2 if causal else 0)
    q, k, v = (torch.randn(B, H, n, hd, generator=g) for n in (Lq, Lk, Lk))
    bias = 3 * torch.randn(B, prefix, generator=g)
    out = attention(*with_key_bias(q, k, v, bias), causal=causal, prefix_len=prefix if causal else 0,
                    scale=hd ** -0.5, backend="torch")
    assert out.shape == (B, H, Lq, hd + 1) and out[..., hd].abs().amax() == 0
    mask = torch.zeros(B, 1, Lq, Lk)
    if causal:
        mask = mask.masked_fill(~attention_mask(Lq, Lk, causal=True, prefix_len=prefix), float("-inf"))
    mask[..., :prefix] += bias[:, None, None, :]
    torch.testing.assert_close(out[..., :hd], F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("read", ["cross", "context"])
def test_read_importance_discounts_each_slot_by_its_importance(tiny_cfg, read):
    """read_importance adds log sigmoid(importance) to a slot's read scores: with every entry's importance
    saturated (log sigmoid = 0) the model computes what it computes without the option; at init it differs, and
    the read passes gradient to the importance of the entries it reads."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", memory_read=read)
    plain, biased = tiny_model(cfg).eval(), tiny_model(dataclasses.replace(cfg, read_importance=True)).eval()
    biased.load_state_dict(plain.state_dict())
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    ids = _ids(3 * cfg.segment_length + 5)
    assert (biased(ids).logits - plain(ids).logits).abs().amax() > 1e-4
    with torch.no_grad():  # a constant shift keeps the select ranking; sigmoid(60 + ...) = 1
        for model in (plain, biased):
            for block in model.blocks:
                block.memory.importance.bias.fill_(60.0)
    torch.testing.assert_close(biased(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
    grads = []
    for flag in (False, True):  # same weights, exact ranking: the read's gradient is added to the write's
        model = tiny_model(dataclasses.replace(cfg, read_importance=flag, select_noise=0.0))
        model.load_state_dict(init)
        model(ids, labels=ids).loss.backward()
        grads.append(model.blocks[0].memory.importance.weight.grad)
    assert grads[0].abs().amax() > 0 and (grads[1] - grads[0]).abs().amax() > 0.01 * grads[0].abs().amax()


@pytest.mark.parametrize("mix", ["depthwise", "full"])
def test_memory_conv_is_a_causal_convolution_over_the_taps(tiny_cfg, mix):
    """memory_conv=K: out_t = sum_j W_j x_{t-j} over the K taps (zeros before the input), W_j diagonal
    (depthwise) or a full D x D map (memory_conv_mix=full); at init each token passes itself through unchanged."""
    cfg = dataclasses.replace(tiny_cfg, memory_write="select", memory_conv=3, memory_conv_mix=mix)
    memory = tiny_model(cfg).blocks[0].memory
    D = cfg.memory_dim
    assert memory.conv.shape == (D, 1 if mix == "depthwise" else D, 3)
    last = memory.conv[:, :, -1]
    torch.testing.assert_close(last, torch.ones(D, 1) if mix == "depthwise" else torch.eye(D), rtol=0, atol=0)
    w = memory.conv.detach()  # [D_out, D_in or 1, K]; tap K - 1 - j weighs x_{t-j}
    taps = [torch.diag(w[:, 0, i]) if mix == "depthwise" else w[:, :, i] for i in range(3)]  # [D, D] each
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(2, 2, D), x], 1)  # [B, 2 + 7, D]
    want = sum(padded[:, i:i + 7] @ taps[i].T for i in range(3))  # [B, 7, D]
    with torch.no_grad():
        torch.testing.assert_close(memory._causal_conv(x, None), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("write, mix", [("gated", "depthwise"), ("select", "depthwise"), ("delta", "depthwise"),
                                        ("select", "full"), ("delta", "full")])
def test_memory_conv_runs_across_segment_boundaries(tiny_cfg, write, mix):
    """memory_conv=K: a segment's convolution sees the last K - 1 compressed tokens of the segments before it, as
    one convolution over the whole input would, also when segments are shorter than K - 1; and the model passes
    each write the tail of the segment written before it (zeros before the first)."""
    cfg = dataclasses.replace(tiny_cfg, memory_write=write, memory_conv=4, memory_conv_mix=mix)
    model = tiny_model(cfg).eval()
    memory = model.blocks[0].memory
    x = torch.randn(2, 13, cfg.memory_dim, generator=torch.Generator().manual_seed(0))
    whole = memory._causal_conv(x, None)  # [B, 13, D]
    tail, pieces = None, []
    for a, b in ((0, 5), (5, 6), (6, 8), (8, 13)):  # pieces of 5, 1, 2 and 5 tokens (K - 1 = 3)
        pieces.append(memory._causal_conv(x[:, a:b], tail))
        tail = memory.tail(x[:, a:b], tail)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tail, x[:, -3:])
    if write == "delta":  # the delta rule is sequential: two writes with the tail carried are one over both
        mem = torch.zeros(2, cfg.memory_slots, cfg.memory_dim)
        split = memory.write(memory.write(mem, x[:, :5]), x[:, 5:], tail=memory.tail(x[:, :5], None))
        torch.testing.assert_close(split, memory.write(mem, x), rtol=1e-4, atol=1e-5)

    calls = []
    write_fn = memory.write

    def spy(mem, g, first=False, tail=None):
        calls.append((g, tail))
        return write_fn(mem, g, first=first, tail=tail)

    memory.write = spy
    with torch.no_grad():
        model(_ids(3 * cfg.segment_length))
    assert calls[0][1] is None
    for (g, _), (_, tail) in zip(calls, calls[1:]):
        torch.testing.assert_close(tail, g[:, -3:], rtol=0, atol=0)
