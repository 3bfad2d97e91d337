"""The resumable log of work done in chunks, shared by evaluation and data selection.

A long evaluation or selection run is played in fixed chunks; each chunk's per-sample records are appended
to a JSONL file together with the chunk's completion marker, in one write that is flushed and fsynced. The
first line records the run's settings, and reopening the file with the same settings gives back everything
recorded so far, so a rerun plays only the chunks not finished. A process killed in the middle of a write
leaves a torn last line; it is ignored (its chunk is simply played again). Reopening with different
settings is refused, because mixing results of two configurations would be silently wrong. Records must
carry their ``chunk`` number.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

CHUNK_DONE = "chunk_done"


class SettingsMismatchError(RuntimeError):
    """The results log was written with other settings; the message lists the differences."""


class ChunkLog:
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

    # ------------------------------------------------------------------ work in chunks
    def finished_chunks(self) -> set[int]:
        return {int(r[CHUNK_DONE]) for r in self.records if CHUNK_DONE in r}

    def run_chunks(self, n_items: int, chunk_size: int, work: Callable[[int, range], list[dict[str, Any]]], *,
                   limit: Optional[int] = None, progress: Optional[str] = None, unit: str = "sample") -> None:
        """Do the chunks of ``n_items`` not recorded yet: ``work(chunk, items)`` returns the chunk's records,
        appended with the chunk's completion marker in one durable write. ``limit`` stops once that many items
        are recorded (whole chunks, so a later run continues seamlessly); ``progress`` names a progress bar."""
        done = self.finished_chunks()
        recorded = sum(min(chunk_size, n_items - c * chunk_size) for c in done if c * chunk_size < n_items)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_items, initial=recorded, unit=unit, desc=progress, file=sys.stderr)
        try:
            for chunk in range(-(-n_items // chunk_size)):
                if chunk in done:
                    continue
                if limit is not None and recorded >= limit:
                    break
                items = range(chunk * chunk_size, min(n_items, (chunk + 1) * chunk_size))
                self.append([*work(chunk, items), {CHUNK_DONE: chunk}])
                recorded += len(items)
                if bar is not None:
                    bar.update(len(items))
        finally:
            if bar is not None:
                bar.close()

    def finished_records(self) -> list[dict[str, Any]]:
        """The records of finished chunks (a torn or interrupted chunk's are left out), in log order."""
        done = self.finished_chunks()
        return [r for r in self.records if CHUNK_DONE not in r and r.get("chunk") in done]


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- Markdown
