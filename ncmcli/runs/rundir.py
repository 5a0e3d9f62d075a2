"""``RunDir``: the one owner of a run folder (its files' names come from ``runfiles``), and
the run id that ties a run's checkpoints to its folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ncmcli.runs.runfiles import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    PARENT,
    REPLAY,
    RESULT,
    FolderLock,
    append_metrics,
    holds_run,
    read_metrics,
    resolve_checkpoint,
)
from ncmcli.storage import atomic_write_text

RUN_ID_PREFIX = "# ncm run id: "  # config.yaml's first line ties a run's checkpoints to its folder


def run_id_of_config(text: str) -> str | None:
    """The run id on config.yaml's first line (written by ``ncm train``), if there is one."""
    first = text.split("\n", 1)[0]
    return first[len(RUN_ID_PREFIX) :].strip()[:64] or None if first.startswith(RUN_ID_PREFIX) else None


class RunDir:
    """The one owner of a run folder: its file names, and reading and writing its text files.
    Commands open one per folder; nothing else spells a run-folder file name."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG)
    metrics_file = property(lambda self: self.path / METRICS)
    best = property(lambda self: self.path / BEST)
    last = property(lambda self: self.path / LAST)
    result_file = property(lambda self: self.path / RESULT)
    replay = property(lambda self: self.path / REPLAY)
    parent = property(lambda self: self.path / PARENT)

    def holds_run(self) -> bool:
        return holds_run(self.path)

    def has_result(self) -> bool:
        return self.result_file.is_file()

    def is_resumable(self) -> bool:
        return self.config.is_file() and self.last.is_file()

    def checkpoint(self, which: str = "best") -> Path:
        return resolve_checkpoint(self.path, which)

    def config_text(self) -> str:
        return self.config.read_text(encoding="utf-8", errors="replace")

    def run_id(self) -> str | None:
        return run_id_of_config(self.config_text())

    def write_config(self, yaml_text: str, run_id: str | None, comment: str = "") -> None:
        atomic_write_text(self.config, (f"{RUN_ID_PREFIX}{run_id}\n" if run_id else "") + comment + yaml_text)

    def result(self) -> dict:
        return json.loads(self.result_file.read_text())

    def write_result(self, result: dict) -> None:
        atomic_write_text(self.result_file, json.dumps(result, indent=2) + "\n")

    def metrics(self, note: Callable[[str], None] | None = None) -> list[dict]:
        return read_metrics(self.metrics_file, note)

    def append_metrics(self, metrics: dict) -> None:
        append_metrics(self.metrics_file, metrics)

    def lock(self) -> FolderLock:
        return FolderLock(self.path)


def find_runs(paths, marker: str = RESULT) -> list[Path]:
    """Run folders at or under ``paths``: those holding ``marker`` (result.json: finished runs;
    metrics.jsonl: any run with an epoch)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += [p] if (p / marker).is_file() else sorted(q.parent for q in p.rglob(marker))
    return out
