"""The model with `model.kernels=triton` (the GPU, or the Triton interpreter on CPU) equals `model.kernels=torch`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltm_core import TitanModel
from ltm_core.config import memory_config
from support import kind_config


@pytest.mark.parametrize("kind", ["tokens", "slots"])
def test_model_with_triton_kernels_matches_torch(kind, device):
    memory = memory_config({"kind": kind, "slots": 8, **({"dim": 32} if kind == "slots" else {})})
    cfg = kind_config(kind, hidden_size=64, num_hidden_layers=1, memory=memory)
    torch.manual_seed(0)
    ref = TitanModel(cfg).to(device)
    fused = TitanModel(dataclasses.replace(cfg, kernels="triton")).to(device)
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (1, 2 * cfg.segment_length + 1), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    outs = []
    for model in (ref, fused):
        torch.manual_seed(2)  # the same write noise for both
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
