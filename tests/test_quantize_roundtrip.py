"""`ltm quantize` writes the model it measures: the bits/byte it reports are those of `ltm eval` on its folder and of
quantize-on-load (`ltm eval --quantize`), and the folder reloads to the in-memory quantized model, logits equal.

On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit layer's weights at its first call and its state_dict()
undoes that only in part (ltm_core.quantize's docstring): a folder saved after the model ran held scrambled scales
(nf4 on TINY-64: 4.4220 reported, 4.4117 from the folder, 4.3892 quantized on load). Without AVX512-BF16 the layout
never changes and the tests that need it skip."""

from __future__ import annotations

import json

import pytest
import torch

from support import invoke, one_error_line
from ltm_core.checkpoint import checkpoint_config, load_model, read_checkpoint
from ltm_core.config import DataConfig
from ltm_core.export.safetensors import write_folder
from ltm_core.quantize import quantization_record, quantize_checkpoint, quantize_model

SAMPLES = 2  # validation windows: the numbers are compared exactly, so few are enough


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _eval_bpb(tmp_path, name, *args) -> float:
    report = tmp_path / f"{name}.json"
    result = invoke("eval", *args, f"data.val_samples={SAMPLES}", "--json", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(report.read_text())["bpb"]


@pytest.mark.parametrize("method", ["bnb.nf4", "bnb.fp4", "bnb.nf4-dq", "bnb.fp4-dq", "bnb.int8"])
def test_reported_numbers_are_the_folders_and_quantize_on_load(trained_tiny, tmp_path, method):
    data = DataConfig(**{**checkpoint_config(read_checkpoint(trained_tiny))["data"], "val_samples": SAMPLES})
    out = tmp_path / "q"
    result = quantize_checkpoint(trained_tiny, method, out, data, gen_tokens=2)
    reported = result["rows"][1]["bpb"]
    from_folder = _eval_bpb(tmp_path, "folder", "--checkpoint", str(out))
    on_load = _eval_bpb(tmp_path, "on_load", "--checkpoint", str(trained_tiny), "--quantize", method)
    assert (reported, from_folder) == pytest.approx((on_load, on_load), rel=0, abs=1e-9)

    # the folder is the model quantized in memory, after that one has run (and been run again)
    in_memory = load_model(trained_tiny)
    quantize_model(in_memory, method)
    ids = _ids()
    first = _logits(in_memory, ids)
    torch.testing.assert_close(_logits(load_model(out), ids), first, rtol=0, atol=0)
    torch.testing.assert_close(_logits(in_memory, ids), first, rtol=0, atol=0)


def _ran_on_cpu_kernel(model) -> list[str]:
    _logits(model, _ids())
    names = [name for name, m in model.named_modules()
             if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if not names:
        pytest.skip("bitsandbytes keeps the portable 4-bit layout on this CPU (no AVX512-BF16)")
    return names


def test_measuring_a_model_that_ran_leaves_it_unchanged_and_saving_it_is_refused(trained_tiny):
    from ltm_core.errors import LtmError
    from ltm_core.quantize import quantized_state_dict, tensor_bytes

    model = load_model(trained_tiny)
    quantize_model(model, "bnb.nf4")
    _ran_on_cpu_kernel(model)
    before = _logits(model, _ids())
    assert tensor_bytes(model) > 0  # through state_dict(), which bitsandbytes lets change the layer: on a copy
    torch.testing.assert_close(_logits(model, _ids()), before, rtol=0, atol=0)
    with pytest.raises(LtmError, match="save a quantized model before its first inference call"):
        quantized_state_dict(model)


def test_a_folder_saved_after_the_model_ran_is_refused_in_one_line(trained_tiny, tmp_path):
    """What `ltm quantize` wrote before the fix: the absmax left as bitsandbytes' CPU kernel holds it."""
    model = load_model(trained_tiny)
    names = quantize_model(model, "bnb.nf4")
    _ran_on_cpu_kernel(model)
    write_folder(tmp_path, model.state_dict(), checkpoint_config(read_checkpoint(trained_tiny)),
                 quantization_record("bnb.nf4", names, model))
    one_error_line(invoke("eval", "--checkpoint", str(tmp_path), "data.val_samples=1"),
                   "checkpoint error: the 4-bit layer blocks.0.", "bitsandbytes' CPU inference layout",
                   "absmax bfloat16 [", "re-run ltm quantize on the unquantized checkpoint")


def test_quantize_on_a_task_names_the_data_argument(trained_tiny, tmp_path):
    """The checkpoint was trained on kjv; the user asked for data=passkey: the line says that, not 'trained on'."""
    result = invoke("quantize", "-c", str(trained_tiny), "--method", "bnb.nf4", "--out", str(tmp_path / "q"),
                    "data=passkey")
    one_error_line(result)
    assert result.stderr.strip() == (
        "error: config error: data: quantize measures bits/byte on text, and data=passkey is a task: pass data=kjv, "
        "data=pystdlib or data=textfile data.path=FILE; for the task after quantizing, run "
        f"ltm eval -c {trained_tiny} --quantize bnb.nf4 task=passkey")
    assert not (tmp_path / "q").exists()
