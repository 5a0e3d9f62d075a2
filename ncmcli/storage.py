"""Files written safely, anywhere: atomic replacement, bounded JSON reading, and the cache
folder. A leaf: the library (``ncmcli.nn``'s anchor cache), the data caches and the run folder
all use it, and it imports nothing of ncm's."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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


# atomic_write's temp files: ".NAME.XXXXXXXX.tmp" beside their target.
TEMP_GLOB = ".*.tmp"


def remove_stale_temps(folder: Path) -> None:
    """Remove the temp files a process killed mid-write (SIGKILL) left in ``folder``."""
    for stale in Path(folder).glob(TEMP_GLOB):
        stale.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temp file in the same folder, fsync, then rename, so a
    crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
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


def cache_dir() -> Path:
    """$NCM_CACHE, else $XDG_CACHE_HOME/ncm (~/.cache/ncm): decoded image folders go in its
    ``folders/``, optimized anchors in its ``anchors/``."""
    if os.environ.get("NCM_CACHE"):
        return Path(os.environ["NCM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ncm"
