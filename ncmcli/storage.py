"""Files written safely, anywhere: atomic replacement through one temp-file discipline, files
of tensors with a digest of their data, appended lines, bounded JSON reading, and the cache
folder. A leaf: the library (``ncmcli.nn``'s anchor cache), the data caches, the run folder
and the exports all use it, and it imports nothing of ncm's (torch and safetensors only on
first use, so ``ncm --help`` stays fast)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_JSON_DEPTH = 64  # ncm's own files nest 4 deep; deeper input is refused before parsing
_JSON_STRING = None


def bounded_json(text: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` that refuses input nested deeper than ``max_depth`` (ValueError) before
    parsing it: deeply nested brackets would otherwise end in a RecursionError."""
    import re

    global _JSON_STRING
    if text.count("[") + text.count("{") > max_depth:
        if _JSON_STRING is None:
            _JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
        depth = 0
        for ch in _JSON_STRING.sub("", text):
            if ch in "[{":
                depth += 1
                if depth > max_depth:
                    raise ValueError(f"JSON nested deeper than {max_depth} levels")
            elif ch in "]}":
                depth -= 1
    return json.loads(text)


class FileNote(UserWarning):
    """Something a user should hear about a file that is still used (a file without a digest,
    a cache rebuilt): the CLI prints it as one line on stderr."""


# Every temp file ncm writes: ".NAME.ncm<PID>.XXXXXXXX.tmp" beside its target NAME, so a sweep
# knows whose it is and removes it only when that process is gone.
_TEMP = re.compile(r"^\.(?P<name>.+)\.ncm(?P<pid>\d+)\.[^.]+\.tmp$")
# Left by older versions: ncm's ".NAME.XXXXXXXX.tmp" (no PID) and safetensors' ".tmpXXXXXX".
_LEGACY_TEMP = re.compile(r"^(\..+\.[A-Za-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6})$")
LEGACY_TEMP_AGE_S = 3600.0  # outside a locked run folder, a legacy temp this old is stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: Path, *, target: str | None = None, locked: bool = False) -> list[Path]:
    """Remove the temp files that writers killed mid-write (SIGKILL) left in ``folder``: ncm's
    own whose process is gone; legacy ones (no PID) when ``locked`` (the caller holds the
    folder's lock, so no writer of another version is live) or when over an hour old.
    ``target``: only the temps of that file name (an export's target). Returns the removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m is not None:
            stale = (target is None or m["name"] == target) and not _alive(int(m["pid"]))
        else:
            stale = bool(_LEGACY_TEMP.match(p.name)) and (target is None or p.name.startswith(f".{target}."))
            stale = stale and (locked or _age(p) > LEGACY_TEMP_AGE_S)
        if stale and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def temp_path_for(path: Path) -> Path:
    """A new, empty temp file beside ``path``, named for the sweep (``_TEMP``)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.ncm{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temp file in the same folder, fsync, then rename, so a
    crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_line(path: Path, line: str) -> None:
    """Append one line and make it durable. A crash mid-append can leave a torn last line (no
    newline); the run's resume drops it before appending (``train.resume.repair_metrics``)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def cache_dir() -> Path:
    """$NCM_CACHE, else $XDG_CACHE_HOME/ncm (~/.cache/ncm): decoded image folders go in its
    ``folders/``, optimized anchors in its ``anchors/``."""
    if os.environ.get("NCM_CACHE"):
        return Path(os.environ["NCM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ncm"


# -- Files of tensors: one digest over their data, one read each --------------------------

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on its JSON header
DIGEST_KEY = "ncm_digest"  # in a safetensors file's metadata: "sha256:<hex>" of its data bytes


class CorruptFile(ValueError):
    """A file of tensors whose data no longer matches the digest it was written with."""


@dataclass
class TensorFile:
    """A safetensors file read from disk in one ``open``: its metadata, its tensors' header
    entries and its data bytes, checked against the digest in its metadata before any tensor
    is decoded. ``digest`` is None for a file written before ncm wrote digests."""

    path: Path
    meta: dict
    header: dict
    data: bytes
    digest: str | None

    def tensors(self) -> dict:
        """Every tensor, on the CPU (``safetensors.torch.load`` over the bytes already read)."""
        from safetensors.torch import load

        return load(_header_bytes(self.header, self.meta) + self.data)


def tensor_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """``tensors`` as safetensors bytes whose metadata carries the sha256 of their data section
    (``DIGEST_KEY``). safetensors writes offsets relative to the data section, so adding a
    metadata entry leaves the data bytes as they are."""
    from safetensors.torch import save

    raw = save(tensors, metadata={k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY} or None)
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    meta = dict(header.pop("__metadata__", None) or {})
    meta[DIGEST_KEY] = "sha256:" + hashlib.sha256(data).hexdigest()
    return _header_bytes(header, meta) + data


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (with ``metadata`` and a digest of their data) atomically. The bytes
    are built in memory and written by ``atomic_write``: no temp file but ncm's own."""
    blob = tensor_bytes(tensors, metadata)
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))


def read_tensor_file(path: Path, *, verify: bool = True, note_undigested: bool = True) -> TensorFile:
    """One read of a safetensors file, its digest checked (``CorruptFile`` on a mismatch; a
    ``ValueError`` for a file that is not safetensors at all). One ``open`` of the path, so a
    writer's rename in between can never mix two versions of the file, as a reader that opens
    the path twice (safetensors' ``safe_open`` re-opens it for the data) can."""
    with open(path, "rb") as fh:
        raw = fh.read()
    header, meta, n = parse_header(raw)
    data = raw[8 + n :]
    digest = (
        check_digest(path, meta, data, note_undigested=note_undigested) if verify else meta.get(DIGEST_KEY)
    )
    return TensorFile(Path(path), meta, header, data, digest)


def parse_header(raw: bytes) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, header length) of a safetensors file's bytes (or its first
    bytes: the 8-byte little-endian length and that much JSON); ValueError says what is wrong."""
    if len(raw) < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = int.from_bytes(raw[:8], "little")
    if n > min(len(raw) - 8, MAX_HEADER_BYTES):
        raise ValueError(f"its header claims {n} bytes, more than the file holds")
    try:
        header = bounded_json(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("its metadata is not a map of strings")
    return header, meta, n


def check_digest(path: Path, meta: dict, data: bytes, *, note_undigested: bool = True) -> str | None:
    """Check ``data`` (a safetensors file's data section) against the digest in ``meta``:
    ``CorruptFile`` on a mismatch; a ``FileNote`` warning when there is none (a file written
    before ncm wrote digests still loads). Returns the digest."""
    digest = meta.get(DIGEST_KEY)
    if digest is None:
        if note_undigested:
            warnings.warn(
                FileNote(
                    f"note: {path} carries no digest (written before ncm 0.4.0), so its data is not checked"
                ),
                stacklevel=3,
            )
        return None
    algo, _, expected = digest.partition(":")
    if algo != "sha256" or hashlib.sha256(data).hexdigest() != expected:
        raise CorruptFile(f"{path} is corrupt: its tensor data does not match the digest it was written with")
    return digest


def _header_bytes(header: dict, meta: dict) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 bytes (the
    alignment safetensors keeps for the data that follows)."""
    text = json.dumps({"__metadata__": meta, **header} if meta else header, separators=(",", ":"))
    body = text.encode("utf-8")
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body
