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
