"""`ltm quantize` and `ltm export`: thin layers over ltm_core.quantize.quantize_checkpoint and
ltm_core.export.export_checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ltm_cli.errors import check_overrides, device_option, file_name, output_file, user_errors, write_json

console = Console()


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


@user_errors
def quantize_cmd(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A .ckpt written by `ltm train` (or an exported "
                                    "safetensors folder)."),
    method: str = typer.Option(..., "--method", "-m", help="bnb.int8 | bnb.nf4 | bnb.nf4-dq | bnb.fp4 | bnb.fp4-dq."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the quantized checkpoint (safetensors + config)."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Also quantize the LM head (a quantized copy; the tied "
                                 "embedding stays in full precision)."),
    skip: List[str] = typer.Option([], "--skip", help="Keep the linear layers matching this pattern in full "
                                   "precision, e.g. 'blocks.*.memory.*' (repeatable)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", min=1, help="Tokens generated to measure tokens/s."),
    json_path: Optional[Path] = typer.Option(None, "--json", parser=file_name,
                                             help="Also write the comparison to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
):
    """Quantize a checkpoint's linear layers with bitsandbytes and compare it with the unquantized model.

    Arguments are data overrides for the bits/byte comparison (default: the checkpoint's data), e.g.
    `data.val_samples=16` or `data=textfile data.path=FILE`. `ltm generate|eval --checkpoint OUT` load the result."""
    from ltm_core.errors import ConfigError
    from ltm_core.export import check_output_folder
    from ltm_core.quantize import check_method

    check_method(method)  # options first: they fail in a moment, before the heavy imports
    dev = device_option(device)
    output_file(json_path, "--json")
    check_output_folder(out, overwrite, checkpoint)
    overrides = list(ctx.args)
    check_overrides(overrides, ("data",), "quantize")
    from ltm_core.checkpoint import checkpoint_config, read_checkpoint
    from ltm_core.evaluate import eval_data
    from ltm_core.quantize import quantize_checkpoint
    from ltm_core.tasks import is_task

    text = dict(o.lstrip("+~").split("=", 1) for o in overrides).get("data")
    if text is not None and is_task(text):  # (a checkpoint trained on a task, with no data=, stops in eval_data)
        raise ConfigError("data", f"quantize measures bits/byte on text, and data={text} is a task: pass data=kjv, "
                                  "data=pystdlib or data=textfile data.path=FILE; for the task after quantizing, run "
                                  f"ltm eval -c {checkpoint} --quantize {method} task={text}")
    ckpt = read_checkpoint(checkpoint)
    data = eval_data(checkpoint_config(ckpt), overrides)
    if is_task(data.name):  # data.name=TASK
        raise ConfigError("data.name", f"quantize measures bits/byte on text, and {data.name} is a task: pass "
                                       "data=kjv, data=pystdlib or data=textfile data.path=FILE")
    result = quantize_checkpoint(checkpoint, method, out, data, lm_head=lm_head, skip=skip, device=dev,
                                 gen_tokens=gen_tokens, overwrite=overwrite)
    console.print(f"quantized {len(result['quantized_layers'])} linear layers "
                  f"({100 * result['quantized_share']:.1f} % of the parameters) with {method}; kept in full "
                  f"precision: {'; '.join(result['kept'])}", soft_wrap=True)
    table = Table(title=f"ltm quantize {checkpoint} — {result['device']}, bits/byte on {result['data']} "
                        f"({result['val_tokens']:,} tokens), tokens/s: median of 3 greedy generations of {gen_tokens}")
    for column in ("model", "disk", "memory", "bits/byte", "Δ bits/byte", "tokens/s"):
        table.add_column(column, justify="right")
    base, quant = result["rows"]
    table.add_row("unquantized", _mib(base["disk_bytes"]), _mib(base["memory_bytes"]), f"{base['bpb']:.4f}", "",
                  f"{base['tokens_per_s']:.1f}")
    table.add_row(method, f"{_mib(quant['disk_bytes'])} ({quant['disk_ratio']:.2f}x)",
                  f"{_mib(quant['memory_bytes'])} ({quant['memory_ratio']:.2f}x)", f"{quant['bpb']:.4f}",
                  f"{quant['bpb_delta']:+.4f} ({quant['bpb_delta_pct']:+.2f} %)",
                  f"{quant['tokens_per_s']:.1f} ({quant['speed_ratio']:.2f}x)")
    console.print(table)
    console.print(f"wrote {out}; run it with: ltm generate --checkpoint {out}", soft_wrap=True)
    if json_path is not None:
        from ltm_cli.bench import run_meta

        write_json(json_path, {**result, "meta": run_meta()})
        console.print(f"wrote {json_path}")


@user_errors
def export_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A .ckpt written by `ltm train` (or a safetensors "
                                    "folder)."),
    fmt: str = typer.Option(..., "--format", "-f", help="safetensors | hf | onnx."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    shard_size: str = typer.Option("2GB", "--shard-size", help="safetensors/hf: largest weight file, e.g. 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Export a checkpoint: safetensors (weights + config.json, sharded above --shard-size; `ltm` loads it back),
    hf (a Hugging Face folder: AutoModelForCausalLM/AutoTokenizer with trust_remote_code), onnx (prefill and
    decode graphs with the memory state as explicit inputs and outputs; see its README)."""
    from ltm_core.export import check_format, check_output_folder, export_checkpoint

    check_format(fmt)
    check_output_folder(out, overwrite, checkpoint)
    written = export_checkpoint(checkpoint, fmt, out, overwrite, parse_size(shard_size))
    files = sorted(p.name for p in written.iterdir())
    console.print(f"wrote {written}: {', '.join(files)}", soft_wrap=True)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KB' or a byte count -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    from ltm_core.errors import ConfigError

    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError("--shard-size", f"must be a positive size such as 2GB or 500MB, got {text!r}")
    return size
