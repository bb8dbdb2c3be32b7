"""matplotlib (the `plot` extra), loaded when a `--plot` file is asked for."""

from __future__ import annotations

from pathlib import Path

from ltm_core.errors import ConfigError, LtmError


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LtmError("--plot needs matplotlib: pip install 'ltm[plot]' (or pip install matplotlib)") from None
    return plt


def check_plot_path(path: str | Path) -> None:
    """Fail before any work when matplotlib is missing or cannot write `path`'s format (from its suffix)."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()  # {"png": "Portable Network Graphics", ...}
    if Path(path).suffix.lstrip(".").lower() not in formats:
        raise ConfigError("--plot", f"{path}: the file name must end in one of "
                                    f"{', '.join('.' + f for f in sorted(formats))}")


def plot_loss_by_position(results: dict, path: str | Path) -> None:
    """`ltm eval --by-position --plot`: bits/byte per token-position bin, one line per run of `results["runs"]`
    (each a `loss_by_position` result with a `label`), on a log position axis so the first segment's bins show;
    dotted lines at the segment boundaries of the bins."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    segment, length = results["bin_segment"], results["seq_len"]
    for boundary in range(segment, length, segment):
        ax.axvline(boundary, color="0.85", linewidth=0.8, linestyle=":", zorder=0)
    for run in results["runs"]:
        centres = [(b["start"] + b["end"]) / 2 for b in run["bins"]]
        ax.plot(centres, [b["bpb"] for b in run["bins"]], marker="o", markersize=3, linewidth=1.2,
                label=f"{run['label']}: {run['bpb']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel(f"token position in the sample (bins; dotted: segments of {segment})")
    ax.set_ylabel("validation bits/byte")
    where = results["data"] if results.get("path") is None else results["path"]
    ax.set_title(f"loss by position: {where}, {length:,} tokens, {results['windows']} windows", fontsize=10)
    ax.legend(fontsize=8, title="run: mean bits/byte", title_fontsize=8)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
