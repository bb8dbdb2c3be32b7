"""`ltm bench parallel`: communication volume per training step of each parallel preset, measured beside the
analytic formula (library: `ltm_core.parallel.bench.bench_parallel`).

Register with: `bench_app.command("parallel")(bench_parallel_cmd)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ltm_cli.errors import file_name, output_file, user_errors, write_json
from ltm_cli.progress import progress_bar

console = Console()


@user_errors
def bench_parallel_cmd(
    presets: List[str] = typer.Option(["ddp", "fsdp", "tp2", "pp2", "tp2_pp2"], "--preset", "-p",
                                      help="Parallel presets from conf/parallel (repeatable)."),
    steps: int = typer.Option(1, "--steps", help="Measured training steps per preset (after 1 warm-up)."),
    defaults: bool = typer.Option(True, "--small/--as-configured",
                                  help="Use the small bench model (hidden 64, 4 layers, seq 128) or the config."),
    json_path: Optional[Path] = typer.Option(None, "--json", parser=file_name, help="Write the rows as JSON."),
    overrides: List[str] = typer.Argument(None, help="Config overrides, e.g. model.hidden_size=128 data.seq_len=256."),
):
    """Bytes moved by collectives and pipeline sends in one training step, per preset (measured with a
    dispatch-mode counter, as CommDebugMode) beside the analytic formula. CPU: gloo, one process per rank."""
    from ltm_core.errors import ConfigError
    from ltm_core.parallel.bench import bench_parallel, rows_table

    if steps < 1:
        raise ConfigError("--steps", f"must be positive, got {steps}")
    output_file(json_path, "--json")
    with progress_bar("bench parallel", "presets") as progress:
        rows = bench_parallel(presets, overrides or [], steps=steps, use_defaults=defaults, progress=progress)
    console.print(rows_table(rows))
    if json_path is not None:
        from ltm_cli.bench import run_meta  # (ltm_cli.bench registers this command: imported here, not above)

        write_json(json_path, {"steps": steps, "overrides": overrides or [], "rows": rows, "meta": run_meta()})
        console.print(f"wrote {json_path}")
