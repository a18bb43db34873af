"""Writing results: every eval command leaves ``<name>.json``, ``<name>.md`` and, where a curve fits, ``<name>.png``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def progress(items: Iterable[Any], desc: str, total: int | None = None) -> Any:
    """``items`` with a progress bar on stderr (tqdm: count, rate, time left), for eval loops that run for more
    than a few seconds; the bar is cleared when the loop ends, so only the result table stays on screen.

    Returns the ``tqdm`` object: iterate over it; ``close()`` it when a loop can stop early.
    """
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, mininterval=0.5, dynamic_ncols=True)


def fit_title(fig: Any, title: str) -> Any:
    """Set ``title`` as the figure's title, wrapped at spaces until it fits the figure's width; returns the text.

    A benchmark title set on the axes ran past the figure on both sides (``bench_pararnn.png``); the figure
    title is centred on the whole figure and ``tight_layout`` makes room for its lines.
    """
    import textwrap

    text = fig.suptitle(title, fontsize=11)
    renderer = fig.canvas.get_renderer()
    width = len(title)
    while width > 20 and text.get_window_extent(renderer).width > 0.95 * fig.bbox.width:
        width -= 4
        text.set_text(textwrap.fill(title, width))
    return text


def format_value(value: Any) -> str:
    """Numbers to short strings for tables (4 significant digits, thousands as plain integers)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    name: str,
    payload: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    plot: Callable[[Any], None] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Print the table and write ``<name>.json`` (``payload`` with ``rows``), ``<name>.md`` and ``<name>.png``.

    ``plot(ax)`` draws on a matplotlib axis. Returns the written paths by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, columns)
    print(table)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps({**payload, "rows": list(rows)}, indent=2, default=str))
    paths["md"].write_text((f"# {title}\n\n" if title else "") + table + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        plot(ax)
        if title:
            fit_title(fig, title)
        fig.tight_layout()
        paths["png"] = out_dir / f"{name}.png"
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return paths
