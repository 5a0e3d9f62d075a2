"""``ncm verify``: check checkpoints, run folders and other files of tensors against the digests
they were written with, without loading a model."""

from __future__ import annotations

from pathlib import Path

from ncmcli.errors import UsageError, special_file
from ncmcli.runs.rundir import RunDir
from ncmcli.runs.runfiles import BEST, LAST, REPLAY, RESULT
from ncmcli.storage import CorruptFile, read_tensor_file


def verify_command(paths: list[Path]) -> list[dict]:
    """One record per path: ``status`` is ok, no-digest (written before ncm wrote digests),
    corrupt or unreadable, with ``detail`` saying what was checked or what failed. A run folder
    is checked whole: its checkpoints and replay memory, config.yaml, metrics.jsonl, result.json."""
    out = []
    for path in map(Path, paths):
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if path.is_dir():
            out.append(_run_folder(path) if RunDir(path).config.is_file() else _folder(path))
        else:
            out.append(_file(path))
    return out


def _file(path: Path) -> dict:
    kind = special_file(path)
    if kind:
        return _record(path, "unreadable", f"{kind}, not a file")
    try:
        f = read_tensor_file(path)
    except CorruptFile:
        return _record(path, "corrupt", "its tensor data does not match the digest it was written with")
    except (OSError, ValueError) as exc:
        return _record(path, "unreadable", f"not a readable safetensors file ({exc})")
    if f.digest is None:
        return _record(path, "no-digest", f"{len(f.header)} tensors; written before ncm wrote digests")
    return _record(path, "ok", f"{len(f.header)} tensors, {f.digest[:15]}... verified")


def _run_folder(path: Path) -> dict:
    run, checked, problems, undigested = RunDir(path), [], [], []
    for name in (BEST, LAST, REPLAY):
        if (path / name).exists():
            rec = _file(path / name)
            checked.append(name)
            if rec["status"] in ("corrupt", "unreadable"):
                problems.append((rec["status"], f"{name} {rec['detail']}"))
            elif rec["status"] == "no-digest":
                undigested.append(name)
    try:
        run.config_text()
        checked.append(run.config.name)
    except Exception as exc:  # a torn or hand-broken config.yaml
        problems.append(("unreadable", f"{run.config.name}: {exc}"))
    notes = []
    rows = run.metrics(notes.append)
    checked.append(f"{run.metrics_file.name} ({len(rows)} epochs)")
    problems += [("unreadable", n.removeprefix("note: ")) for n in notes]
    if run.has_result():
        try:
            run.result()
            checked.append(RESULT)
        except Exception as exc:
            problems.append(("unreadable", f"{RESULT}: {exc}"))
    if problems:
        status = "corrupt" if any(s == "corrupt" for s, _ in problems) else "unreadable"
        return _record(path, status, "; ".join(d for _, d in problems))
    if undigested:
        return _record(path, "no-digest", f"{', '.join(undigested)} written before ncm wrote digests")
    return _record(path, "ok", "checked " + ", ".join(checked))


def _folder(path: Path) -> dict:
    files = sorted(p for p in path.rglob("*.safetensors") if p.is_file())
    if not files:
        return _record(path, "unreadable", "neither a run folder nor a folder of .safetensors files")
    recs = [_file(p) for p in files]
    bad = [r for r in recs if r["status"] in ("corrupt", "unreadable")]
    if bad:
        return _record(
            path, bad[0]["status"], "; ".join(f"{Path(r['path']).name}: {r['detail']}" for r in bad)
        )
    return _record(path, "ok", f"{len(recs)} files checked")


def _record(path: Path, status: str, detail: str) -> dict:
    return {"path": str(path), "status": status, "detail": detail}
