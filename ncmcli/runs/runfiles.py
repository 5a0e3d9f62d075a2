"""The files of a run folder: their names live here and nowhere else."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from ncmcli.errors import CheckpointError, NcmError, UsageError, special_file
from ncmcli.storage import append_line, bounded_json, remove_stale_temps

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
BEST = "best.safetensors"
LAST = "last.safetensors"
RESULT = "result.json"
REPLAY = "replay.safetensors"  # train.replay's memory for later --extend runs
PARENT = "parent.json"  # an --extend run's parent checkpoint (path and sha256), for --resume
LOCK = ".ncm.lock"
TENSORBOARD = "tensorboard"  # the folder of train.tensorboard's event files
RUN_FILES = (CONFIG, METRICS, BEST, LAST, RESULT, REPLAY, PARENT)
# Pictures `ncm plot` writes beside a run, and temp files of interrupted atomic writes.
_OWNED_SUFFIXES = (".png", ".svg", ".pdf", ".tmp")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (CONFIG, LAST))


def foreign_entries(folder: Path) -> list[Path]:
    """Entries that are neither run files nor ncm's own pictures, temp files or lock."""
    return [
        p
        for p in folder.iterdir()
        if p.name not in RUN_FILES
        and p.name not in (LOCK, TENSORBOARD)
        and not p.name.endswith(_OWNED_SUFFIXES)
        and not p.name.startswith(".write-test-")
    ]


def clear_run(folder: Path) -> None:
    """Remove a run's files (for --force), so that nothing of the old run mixes into the new."""
    import shutil

    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / TENSORBOARD, ignore_errors=True)
    remove_stale_temps(folder, locked=True)


class RunLocked(Exception):
    """Another process holds the run folder."""


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/.ncm.lock`` for a whole run. The kernel drops
    it when the process dies, however it dies, so a stale lock cannot outlive its holder.
    The holder's PID is written into the file for the second writer's message."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fh = None

    def __enter__(self) -> FolderLock:
        import fcntl
        import os

        try:  # the first write to the folder: an unwritable one is refused before the run starts
            fh = open(self.path, "a+", encoding="utf-8")
        except PermissionError:
            raise UsageError(f"cannot write the run folder {self.path.parent}: permission denied") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise NcmError(
                f"{self.path.parent} is in use by another ncm process (PID {holder}); "
                "wait for it to finish or stop it first"
            ) from None
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


def append_metrics(path: Path, metrics: dict) -> None:
    """One line per epoch, made durable; a crash mid-line leaves a torn last line that a resume
    drops before appending (``train.resume.repair_metrics``) and readers skip."""
    append_line(path, json.dumps(metrics))


def read_metrics(path: Path, note: Callable[[str], None] | None = None) -> list[dict]:
    """metrics.jsonl as a list of epochs; a blank or partial line (left by a crash mid-write)
    is skipped, with a note, rather than failing the run or the plot."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return read_metrics_lines(lines, path, note)


def read_metrics_lines(lines: list[str], path: Path, note: Callable[[str], None] | None = None) -> list[dict]:
    """The epochs among ``lines`` of ``path``'s metrics, skipping (with a note) unreadable ones."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = bounded_json(line)
            if not isinstance(row, dict) or "epoch" not in row:
                raise ValueError
            out.append(row)
        except ValueError:
            if note is not None:
                note(f"note: skipped line {n} of {path} (blank or partial)")
    return out


def prepare_run_dir(out: Path | None, runs_root: Path, name: str, force: bool) -> tuple[Path, bool]:
    """A fresh run folder, checked writable before any training starts. Unique even for
    runs started in the same second: a random suffix, created with exist_ok=False."""
    if out is not None:
        run_dir = Path(out)
        created = not run_dir.exists()
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--out {run_dir} exists and is not a folder")
        if run_dir.is_dir():
            has_run = holds_run(run_dir)
            if has_run and not force:
                raise UsageError(
                    f"{run_dir} already holds a run; use another --out, or --force to overwrite it"
                )
            if not has_run and any(foreign_entries(run_dir)):
                raise UsageError(
                    f"--out {run_dir} is a non-empty folder that is not a run folder; "
                    "give a new or empty folder"
                )
            if has_run:
                clear_run(run_dir)  # --force: no old metrics lines or checkpoints mix in
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {run_dir} ({exc.strerror})") from None
    else:
        created = True
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).lstrip(".") or "run"
        for _ in range(100):
            run_dir = Path(runs_root) / f"{safe}-{stamp}-{secrets.token_hex(3)}"
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise UsageError(f"cannot create run folder under {runs_root} ({exc.strerror})") from None
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder {run_dir} is not writable ({exc.strerror})") from None
    return run_dir, created


WHICH = ("best", "last")


def resolve_checkpoint(target: Path, which: str = "best") -> Path:
    """A checkpoint file, or a run folder meaning its best.safetensors (``which="last"``: its
    last.safetensors, the final epoch). A folder without the one asked for falls back to the
    other only for ``best`` (a run stopped before its first epoch ended has only ``last``)."""
    if which not in WHICH:
        raise UsageError(f"--which must be best or last, got {which!r}")
    target = Path(target)
    if target.is_dir():
        names = (LAST,) if which == "last" else (BEST, LAST)
        for name in names:
            if (target / name).is_file():
                return target / name
        raise CheckpointError(f"{target} holds no {' or '.join(names)}")
    kind = special_file(target)
    if kind:
        raise UsageError(f"{target} is {kind}, not a checkpoint file; refusing to open it")
    if not target.exists():
        raise UsageError(f"checkpoint not found: {target}")
    return target


def find_checkpoint(explicit: Path | None, env: dict, cwd: Path, which: str = "best") -> tuple[Path, str]:
    """(checkpoint, why): --checkpoint, else $NCM_CHECKPOINT, else the newest
    runs/**/best.safetensors (or last, with ``which``) under the current folder."""
    if explicit is not None:
        return resolve_checkpoint(explicit, which), "--checkpoint"
    if env.get("NCM_CHECKPOINT"):
        return resolve_checkpoint(Path(env["NCM_CHECKPOINT"]), which), "$NCM_CHECKPOINT"
    found = sorted(
        (cwd / "runs").glob(f"**/{BEST if which == 'best' else LAST}"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise UsageError("no checkpoint: pass --checkpoint, set $NCM_CHECKPOINT, or train one into ./runs")
    return found[-1], "the newest under ./runs"
