"""Presenting task results: a rich table per task, and a plot (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich import box
from rich.table import Table

from ltm_core.plotting import pyplot

PLACEMENT_LABELS = {"first_segment": "first", "straddle": "strad"}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f}"


def _depth_label(row: dict) -> str:
    if row["placement"] in PLACEMENT_LABELS:
        return PLACEMENT_LABELS[row["placement"]]
    return f"{100 * row['depth']:.0f}"


def _grid(rows: list[dict], column) -> tuple[list[int], list[str], dict]:
    lengths, columns, cells = [], [], {}
    for row in rows:
        label = column(row)
        if row["length"] not in lengths:
            lengths.append(row["length"])
        if label not in columns:
            columns.append(label)
        cells[row["length"], label] = row
    return lengths, columns, cells


def _column(table: Table, header: str, **kwargs) -> None:
    table.add_column(header, no_wrap=True, min_width=max(len(header), 3), **kwargs)  # "100" fits


def results_table(results: dict, title: Optional[str] = None) -> Table:
    """passkey: exact match % per length x depth (bin centres); mqar: query accuracy % per length x pairs;
    babi_facts: exact match % per length."""
    task, rows = results["task"], results["rows"]
    memory = "memory" if results.get("memory", True) else "no memory"
    caption = (f"{memory}; trained at {results['train_length']} tokens, segment {results['segment_length']}; "
               f"seed {results['seed']}; filler {results['filler']}")
    what = {"passkey": "exact match % by context length and needle depth % (first: needle in the first segment; "
                       "strad: the key split by a segment boundary, or right after one for a 1-digit key; mean: of the "
                       "depth bins; digit: per-digit accuracy %)",
            "mqar": "accuracy % at the query positions / of the first query alone, by context length and pairs "
                    "(chance 4 %; recalling the stored values without their keys: ~100/pairs % on the first query)",
            "babi_facts": "exact match % by context length (chance 17 %: 6 rooms); after a move: the samples whose "
                          "person was in another room before their last fact (share of samples), exact match and "
                          "answered with a room the person had left"}[task]
    table = Table(title=f"{title or f'ltm eval task={task}'}\n{what}", caption=caption, box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    _column(table, "length", justify="right")
    if task == "passkey":
        lengths, columns, cells = _grid(rows, _depth_label)
        for label in columns:
            _column(table, label, justify="right")
        _column(table, "mean", justify="right")
        _column(table, "digit", justify="right")
        for length in lengths:
            binned = [cells[length, c] for c in columns if cells[length, c]["placement"] == "depth"]
            scored = [r for r in binned if r["exact_match"] is not None]
            mean = sum(r["exact_match"] for r in scored) / len(scored) if scored else None
            digits = sum(r["digit_accuracy"] for r in scored) / len(scored) if scored else None
            table.add_row(f"{length:,}", *[_pct(cells[length, c]["exact_match"]) for c in columns], _pct(mean),
                          _pct(digits))
    elif task == "mqar":
        lengths, columns, cells = _grid(rows, lambda r: f"{r['pairs']} pairs")
        for label in columns:
            _column(table, label, justify="right")
        for length in lengths:
            table.add_row(f"{length:,}", *[_pct(cells[length, c].get("accuracy")) + (
                f" / {_pct(cells[length, c]['first_query_accuracy'])}"
                if cells[length, c].get("first_query_accuracy") is not None else "") for c in columns])
    else:
        for header in ("exact match %", "after a move: share %", "exact %", "room left %", "samples"):
            _column(table, header, justify="right")
        for row in rows:
            table.add_row(f"{row['length']:,}", *[_pct(row.get(k)) for k in ("exact_match", "overwrite_share",
                                                                             "overwrite_match", "stale_answer")],
                          str(row["samples"]))
    return table


def plot_results(results: dict, path: str | Path) -> None:
    """passkey: heatmap of exact match over length x depth; mqar: accuracy against pairs, one line per length;
    babi_facts: exact match against length with the chance level."""
    plt = pyplot()
    task, rows = results["task"], results["rows"]
    memory = "memory" if results.get("memory", True) else "no memory"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if task == "passkey":
        lengths, columns, cells = _grid(rows, _depth_label)
        grid = [[cells[n, c]["exact_match"] if cells[n, c]["exact_match"] is not None else float("nan")
                 for c in columns] for n in lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="exact match")
    elif task == "mqar":
        lengths, columns, cells = _grid(rows, lambda r: r["pairs"])
        for n in lengths:
            points = [(p, cells[n, p]["accuracy"]) for p in columns if cells[n, p].get("accuracy") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{n:,} tokens")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy at query positions")
        ax.set_ylim(0, 1.02)
        ax.legend()
    else:
        points = [(r["length"], r["exact_match"]) for r in rows if r["exact_match"] is not None]
        ax.plot(*zip(*points), marker="o", label=memory)
        ax.axhline(1 / 6, color="grey", linestyle="--", label="chance (1/6)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1.02)
        ax.legend()
    ax.set_title(f"{task} ({memory}, trained at {results['train_length']} tokens)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
