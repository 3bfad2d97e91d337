"""Pieces shared by the selection and evaluation commands: a resumable results log, Markdown tables, plots.

:class:`ResultsLog` is what makes a long run resumable: per-sample results are appended to a JSONL file
chunk by chunk (flushed and fsynced), the first line records the run's settings, and reopening the file
with the same settings gives back everything recorded so far. A process killed in the middle of a write
leaves a torn last line; it is ignored (its chunk is simply played again). Reopening with different
settings is refused, because mixing results of two configurations would be silently wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class SettingsMismatchError(RuntimeError):
    """The results log was written with other settings; the message lists the differences."""


class ResultsLog:
    """An append-only JSONL log of result records, with a settings header checked on resume."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # normalised as stored (tuples -> lists)
        self.records: list[dict[str, Any]] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"settings": self.settings}) + "\n")
                _sync(fh)

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        header = json.loads(lines[0])
        stored = header.get("settings", {})
        if stored != self.settings:
            diff = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {self.settings.get(k)!r}" for k in diff)
            raise SettingsMismatchError(f"{self.path} was written with other settings ({details}); "
                                        "use another output location or --overwrite")
        good = [lines[0]]
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
                good.append(line)
            except json.JSONDecodeError:
                break  # a torn write: everything after it is dropped and replayed
        if len(good) != sum(1 for line in lines if line.strip()):
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("\n".join(good) + "\n", encoding="utf-8")
            tmp.replace(self.path)

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records durably (one write, then fsync): after this returns they survive a kill."""
        records = [json.loads(json.dumps(dict(r))) for r in records]
        if not records:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            _sync(fh)
        self.records.extend(records)

    def done_keys(self, field: str = "key") -> set[str]:
        return {str(r[field]) for r in self.records if field in r}


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- Markdown
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
