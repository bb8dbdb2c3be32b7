"""Weight quantization with bitsandbytes (litgpt's method names), on CPU and CUDA.

    bnb.int8     LLM.int8(): int8 weights, one scale per output row; input columns with an outlier (|x| > 6) in fp16
    bnb.nf4      4-bit NormalFloat, one absmax per block of 64 weights (QLoRA)
    bnb.nf4-dq   nf4 with the absmaxes quantized again (double quantization: ~0.4 bits less per weight)
    bnb.fp4      4-bit float, blocks of 64
    bnb.fp4-dq   fp4 with double quantization

What is quantized: every linear layer of the blocks (self-attention, feed-forward, the memory's write and read
projections), found by type, not by name, so new memory kinds are covered. Kept in full precision: the token
embedding (a lookup table, not a matmul), the LM head unless asked (`lm_head=True`: a quantized copy, the
embedding stays), linear layers with a single output (the memory's importance score w_s: nothing to save, and its
ranking decides what the memory keeps), norms, the learned initial memory and convolutions (parameters, not layers).

A quantized model saves as a safetensors folder (`ltm_core.export.safetensors`) whose config.json records the method
and the layers; `ltm_core.checkpoint.load_model` rebuilds those layers from their stored state.

Save a 4-bit model before its first inference call. On a CPU with AVX512-BF16, bitsandbytes (0.49-0.50) rewrites a
Linear4bit's weights in place at its first call for its faster kernel (`weight.quant_state.packing_format_for_cpu`:
nibbles regrouped by 32 rows, absmax as a [blocks per row, rows] bfloat16 matrix, double quantization undone), and
its state_dict() undoes that only in part: the weights, but not a plain nf4/fp4 absmax (left transposed in bfloat16,
which the next call then reads as if it were [rows, blocks per row]: scales on the wrong blocks) and a -dq absmax
quantized again from its bfloat16 copy. So state_dict() after a call saves scrambled scales and also changes the model
in memory. `quantize_checkpoint` writes its folder before any call and measures the model it loads back from it;
`load_quantized_layers` refuses a layer stored in that layout (folders written by an earlier `ltm quantize`).
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ltm_core.errors import CheckpointError, ConfigError, LtmError

METHODS = ("bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (litgpt's too)
BLOCKSIZE = 64  # weights per 4-bit absmax block
CPU_PACK_ROWS = 32  # rows per group of bitsandbytes' AVX512-BF16 CPU layout of 4-bit weights


class _DropNote(logging.Filter):
    """Drops one of bitsandbytes' log lines that is not a problem for ltm's use (by its start)."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# on every int8 call: fp32 inputs go through fp16 (that is the method)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropNote("MatMul8bitLt: inputs will be cast"))
# at import on AVX512-BF16 CPUs where `kernels` (a transformers dependency) is installed: the Hub's 4-bit kernel is
# not trusted without trust_remote_code, so bitsandbytes' own CPU kernel runs (ltm does not load remote code)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNote("Failed to load CPU gemm_4bit_forward"))


def check_method(method: str, option: str = "--method") -> str:
    if method not in METHODS:
        raise ConfigError(option, f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # a declared dependency; its native library can still fail to load
        raise LtmError(f"quantization needs bitsandbytes (pip install 'bitsandbytes>=0.45'): {exc}") from None
    return bitsandbytes


def is_quantized(model: nn.Module) -> bool:
    bnb = _bnb()
    return any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def quantizable(model: nn.Module, lm_head: bool = False, skip: Iterable[str] = ()) -> list[str]:
    """Names of the linear layers `quantize_model` replaces (module docstring); `skip`: fnmatch patterns of names
    kept in full precision (e.g. "blocks.*.memory.*")."""
    skip = list(skip)
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.out_features == 1:
            continue
        if not (name.startswith("blocks.") or (lm_head and name == "lm_head")):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, method: str, lm_head: bool = False, skip: Iterable[str] = ()) -> list[str]:
    """Replace the model's quantizable linear layers by bitsandbytes layers, in place; returns their names."""
    check_method(method)
    if is_quantized(model):
        raise CheckpointError("checkpoint error: the model is already quantized; quantize the unquantized checkpoint")
    names = quantizable(model, lm_head, skip)
    if not names:
        total = len(quantizable(model, lm_head))
        reason = f"the skip patterns exclude all {total}" if total else "the model has none"
        raise LtmError(f"quantize error: no linear layer to quantize ({reason})")
    for name in names:
        linear = model.get_submodule(name)
        _set_submodule(model, name, quantized_linear(linear, method))
    return names


def quantized_linear(linear: nn.Linear, method: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized by `method`, on its device."""
    bnb = _bnb()
    weight = linear.weight.detach()
    if method == "bnb.int8":
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))  # [out, in] int8, [out]
        stats = {"SCB": scales}
        return _build(linear.in_features, linear.out_features, linear.bias, method, rows, stats, weight.device)
    _, quant_type, double = _four_bit(method)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=double,
                                                 quant_type=quant_type)
    stats = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    return _build(linear.in_features, linear.out_features, linear.bias, method, packed, stats, weight.device)


def _four_bit(method: str) -> tuple[str, str, bool]:
    kind = method.split(".", 1)[1]
    return kind, kind.split("-")[0], kind.endswith("-dq")


def _build(in_features: int, out_features: int, bias: Optional[torch.Tensor], method: str, data: torch.Tensor,
           stats: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The bitsandbytes layer for stored quantized weights: int8 rows + "SCB" scales, or packed 4-bit data + the
    quant state's "weight.*" tensors (as their state_dict names them)."""
    bnb = _bnb()
    has_bias = bias is not None
    if method == "bnb.int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        rows, scales = data.to(device), stats["SCB"].to(device)
        layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
    else:
        _, quant_type, double = _four_bit(method)
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compress_statistics=double,
                                  quant_type=quant_type, device="meta")
        quant_stats = {k[len("weight."):]: v for k, v in stats.items()}
        layer.weight = bnb.nn.Params4bit.from_prequantized(data, quant_stats, device=device, module=layer)
        if out_features % CPU_PACK_ROWS or in_features % BLOCKSIZE:
            # bitsandbytes (0.49-0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first inference
            # call, in groups of 32 rows of whole blocks, and fails on other shapes (the 259-row lm_head, a 32-wide
            # layer): such a layer keeps the portable kernel
            layer.support_avx512bf16_for_cpu = False
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return layer.eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantization_record(method: str, names: list[str], model: nn.Module) -> dict[str, Any]:
    """What config.json keeps to rebuild the layers: the method and each layer's shape and bias."""
    layers = {}
    for name in names:
        layer = model.get_submodule(name)
        layers[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                        "bias": layer.bias is not None}
    return {"method": method, "library": "bitsandbytes", "layers": layers}


def load_quantized_layers(model: nn.Module, record: dict[str, Any], state: dict[str, torch.Tensor],
                          device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rebuild the recorded layers from `state` (names without the "model." prefix) in place; returns the rest of
    the state, for `load_state_dict`."""
    method = check_method(record.get("method", ""))
    rest = dict(state)
    for name, shape in record["layers"].items():
        prefix = f"{name}."
        mine = {k[len(prefix):]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
        if "weight" not in mine or (shape["bias"] and "bias" not in mine):
            raise CheckpointError(f"checkpoint error: the quantized layer {name} has no stored weight")
        stats = {k: v for k, v in mine.items() if k not in ("weight", "bias", "weight_format")}
        if method != "bnb.int8":
            _check_stored_layout(name, shape, mine["weight"], stats)
        layer = _build(shape["in_features"], shape["out_features"], mine.get("bias"), method, mine["weight"], stats,
                       torch.device(device))
        try:
            _set_submodule(model, name, layer)
        except AttributeError:
            raise CheckpointError(f"checkpoint error: the quantized layer {name} is not in the model") from None
    return rest


def _check_stored_layout(name: str, shape: dict[str, Any], weight: torch.Tensor,
                         stats: dict[str, torch.Tensor]) -> None:
    """A stored 4-bit layer is in bitsandbytes' portable layout: the packed weights one column of rows x inputs / 2
    bytes, one absmax per block in a flat vector. Earlier `ltm quantize` runs saved the absmax after bitsandbytes'
    CPU repacking (module docstring): a [blocks per row, rows] bfloat16 matrix whose order the loader cannot tell
    (transposed once or scrambled again); such a folder is refused."""
    absmax = stats.get("weight.absmax")
    weights = shape["out_features"] * shape["in_features"]
    layout_ok = (absmax is not None and absmax.dim() == 1 and weight.dim() == 2 and weight.shape[1] == 1
                 and weight.numel() * weight.element_size() == (weights + 1) // 2)
    if layout_ok and "weight.nested_absmax" not in stats:  # a plain absmax: one float32 per block
        layout_ok = absmax.dtype == torch.float32 and absmax.numel() == -(-weights // BLOCKSIZE)
    if not layout_ok:
        found = "none" if absmax is None else f"{str(absmax.dtype).replace('torch.', '')} {list(absmax.shape)}"
        raise CheckpointError(f"checkpoint error: the 4-bit layer {name} was saved in bitsandbytes' CPU inference "
                              f"layout (absmax {found}, by an ltm quantize that ran the model before saving it): its "
                              "scales are scrambled; re-run ltm quantize on the unquantized checkpoint")


def repacked_layers(model: nn.Module) -> list[str]:
    """Names of the 4-bit layers bitsandbytes has rewritten for its CPU kernel (their first call on an AVX512-BF16
    CPU): their state_dict() would save scrambled scales and change them in memory (module docstring)."""
    return [name for name, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state to save (or measure), taken before any inference call: a 4-bit layer that has run is
    refused rather than saved wrong (module docstring)."""
    repacked = repacked_layers(model)
    if repacked:
        raise LtmError(f"quantize error: {', '.join(repacked[:3])} already ran on the CPU, and bitsandbytes cannot "
                       "save it back as it was; save a quantized model before its first inference call")
    return model.state_dict()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of everything the model holds (weights, quantization states), each shared tensor once, as state_dict()
    gives them: of a copy where a 4-bit layer has run (module docstring: its state_dict() would change it)."""
    import copy

    from ltm_core.export.safetensors import unique_tensors

    state = (copy.deepcopy(model) if repacked_layers(model) else model).state_dict()
    return sum(t.numel() * t.element_size() for t in unique_tensors(state).values())


def generation_speeds(models: list[nn.Module], tokens: int, device: torch.device | str, repeats: int = 3) -> list[float]:
    """Greedy generation tokens/s of each model from a BOS prompt, the state carried: the median of `repeats`
    timings taken in turns (model 1, model 2, model 1, ...), so that a machine busy with other work slows all alike,
    after an untimed warm-up of each."""
    import statistics
    import time

    from ltm_core.inference import InferenceConfig, InferenceEngine
    from ltm_core.tokenizer import BOS

    engines = [InferenceEngine(m, InferenceConfig(temperature=0, stop_at_eos=False)) for m in models]
    prompt = torch.tensor([[BOS]], device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for engine in engines:
        engine.generate(prompt, 8)
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(repeats):
        for engine, taken in zip(engines, times):
            sync()
            start = time.perf_counter()
            engine.generate(prompt, tokens)
            sync()
            taken.append(time.perf_counter() - start)
    return [tokens / statistics.median(taken) for taken in times]


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def quantize_checkpoint(checkpoint, method: str, out, data, *, lm_head: bool = False, skip: Iterable[str] = (),
                        device: str = "cpu", gen_tokens: int = 128, overwrite: bool = False) -> dict[str, Any]:
    """`ltm quantize`: write `checkpoint` quantized by `method` to the folder `out`, and compare it with the
    unquantized model: weights' bytes on disk (safetensors) and in memory, validation bits/byte on `data` (a
    DataConfig) and generation tokens/s. Returns the comparison (rows: unquantized, quantized)."""
    import tempfile
    from pathlib import Path

    from ltm_core.checkpoint import current_run_config, load_model, read_checkpoint
    from ltm_core.data import load_corpus
    from ltm_core.evaluate import evaluate
    from ltm_core.export import check_output_folder, output_folder
    from ltm_core.export.safetensors import write_folder

    check_method(method)
    check_output_folder(Path(out), overwrite, checkpoint)  # never the input's folder: it would be deleted
    ckpt = read_checkpoint(checkpoint)
    if ckpt.get("quantization"):
        raise CheckpointError(f"checkpoint error: {checkpoint} is already quantized "
                              f"({ckpt['quantization']['method']}); quantize the unquantized checkpoint")
    run_config = current_run_config(ckpt, checkpoint)  # a legacy checkpoint's model config in today's keys
    model = load_model(checkpoint, device=device, ckpt=ckpt)
    quantized = load_model(checkpoint, device=device, ckpt=ckpt)
    names = quantize_model(quantized, method, lm_head, skip)  # a bad choice fails before any measurement
    record = quantization_record(method, names, quantized)
    corpus = load_corpus(data)
    rows = [{"model": "unquantized", "memory_bytes": tensor_bytes(model)}, {"model": method}]
    with tempfile.TemporaryDirectory() as tmp:  # the unquantized weights as the same format, for their size
        write_folder(Path(tmp), model.state_dict(), run_config)
        rows[0]["disk_bytes"] = folder_bytes(Path(tmp))
    with output_folder(Path(out), overwrite, checkpoint) as staging:
        # written before any inference call (module docstring), and the model measured is the one the folder
        # loads back as (`ltm eval/generate --checkpoint OUT`), bit for bit
        write_folder(staging, quantized_state_dict(quantized), run_config, record)
        del quantized
        rows[1]["disk_bytes"] = folder_bytes(staging)
        written = load_model(staging, device=device)
        rows[1]["memory_bytes"] = tensor_bytes(written)  # before its first call, as stored
        speeds = generation_speeds([model, written], gen_tokens, device)
        for row, m, speed in zip(rows, (model, written), speeds):
            row.update(bpb=evaluate(m, data, corpus)["bpb"], tokens_per_s=speed)
    base = rows[0]
    rows[1].update(bpb_delta=rows[1]["bpb"] - base["bpb"], bpb_delta_pct=100 * (rows[1]["bpb"] / base["bpb"] - 1),
                   disk_ratio=rows[1]["disk_bytes"] / base["disk_bytes"],
                   memory_ratio=rows[1]["memory_bytes"] / base["memory_bytes"],
                   speed_ratio=rows[1]["tokens_per_s"] / base["tokens_per_s"])
    quantized_params = sum(model.get_submodule(n).weight.numel() for n in names)
    return {"checkpoint": str(checkpoint), "out": str(out), "method": method, "device": str(device),
            "data": data.name if data.name != "textfile" else str(data.path), "val_tokens": data.val_samples * data.seq_len,
            "gen_tokens": gen_tokens, "speed_repeats": 3, "quantized_layers": names,
            "quantized_share": quantized_params / model.num_parameters(), "kept": kept_description(lm_head, skip),
            "rows": rows}


def kept_description(lm_head: bool, skip: Iterable[str]) -> list[str]:
    """What stays in full precision, as the table's caption shows it."""
    kept = ["embed_tokens (a lookup table)"]
    if not lm_head:
        kept.append("lm_head (--lm-head quantizes it)")
    kept += ["single-output layers (the memory's importance score)", "norms, the initial memory, convolutions"]
    kept += [f"layers matching {p}" for p in skip]
    return kept
