"""Report pieces shared by the selection and evaluation commands: Markdown tables, percentages, plots."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats shown with 3 decimals, None as a dash."""
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


# ---------------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_png(path: str | os.PathLike, series: Mapping[str, Sequence[float]], *, bins: Sequence[float],
                  title: str, xlabel: str, ylabel: str = "samples") -> Path:
    """Side-by-side histograms of several series over the same bins, saved as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.hist([list(v) for v in series.values()], bins=list(bins), label=list(series), rwidth=0.9)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bar_png(path: str | os.PathLike, groups: Mapping[str, Mapping[str, float]], *, title: str,
            ylabel: str) -> Path:
    """Grouped bars: one group per outer key (e.g. benchmark), one bar per inner key (e.g. category)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    x, ticks, labels = 0.0, [], []
    for group, bars in groups.items():
        for name, value in bars.items():
            ax.bar(x, value, width=0.8)
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
            ticks.append(x)
            labels.append(f"{group}\n{name}")
            x += 1
        x += 0.6
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
