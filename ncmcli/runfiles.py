"""The files of a run folder: their names live here and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
BEST = "best.safetensors"
LAST = "last.safetensors"
RESULT = "result.json"
LOCK = ".ncm.lock"
RUN_FILES = (CONFIG, METRICS, BEST, LAST, RESULT)
# Pictures `ncm plot` writes beside a run, and temp files of interrupted atomic writes.
_OWNED_SUFFIXES = (".png", ".svg", ".pdf", ".tmp")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (CONFIG, LAST))


def foreign_entries(folder: Path) -> list[Path]:
    """Entries that are neither run files nor ncm's own pictures, temp files or lock."""
    return [p for p in folder.iterdir()
            if p.name not in RUN_FILES and p.name != LOCK and not p.name.endswith(_OWNED_SUFFIXES)
            and not p.name.startswith(".write-test-")]


def clear_run(folder: Path) -> None:
    """Remove a run's files (for --force), so that nothing of the old run mixes into the new."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


class RunLocked(Exception):
    """Another process holds the run folder."""


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/.ncm.lock`` for a whole run. The kernel drops
    it when the process dies, however it dies, so a stale lock cannot outlive its holder.
    The holder's PID is written into the file for the second writer's message."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fh = None

    def __enter__(self) -> "FolderLock":
        import fcntl
        import os

        from ncmcli.errors import NcmError

        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise NcmError(f"{self.path.parent} is in use by another ncm process (PID {holder}); "
                           "wait for it to finish or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the flock
            self.fh = None


def read_metrics(path: Path, note: Callable[[str], None] | None = None) -> list[dict]:
    """metrics.jsonl as a list of epochs; a blank or partial line (left by a crash mid-write)
    is skipped, with a note, rather than failing the run or the plot."""
    if not Path(path).exists():
        return []
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "epoch" not in row:
                raise ValueError
            out.append(row)
        except ValueError:
            if note is not None:
                note(f"note: skipped line {n} of {path} (blank or partial)")
    return out
