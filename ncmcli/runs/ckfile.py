"""A checkpoint file read from disk: CheckpointFile (one read: the header parsed, the tensors
decoded on demand, once), and read_metadata (the header alone). Both refuse anything that is
not an ncm checkpoint of this format version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ncmcli.errors import CheckpointError, special_file
from ncmcli.storage import MAX_HEADER_BYTES, CorruptFile, check_digest, parse_header

FORMAT = "ncm-checkpoint"
FORMAT_VERSION = 1


def read_metadata(path: Path) -> dict:
    """The metadata of a checkpoint (its header alone, read through one open file), refusing
    anything that is not an ncm checkpoint."""
    path = _existing_file(Path(path))
    with open(path, "rb") as fh:
        data = fh.read(8)
        n = int.from_bytes(data, "little") if len(data) == 8 else 0
        data += fh.read(min(n, MAX_HEADER_BYTES))
    meta, _ = _parse_header(path, data)
    _check_format(path, meta)
    return meta


@dataclass
class CheckpointFile:
    """One read of a checkpoint file: its metadata, its tensors' shapes (from the header) and its
    bytes, decoded into tensors on demand, once. ``load`` and ``trainstate.unpack`` both take one,
    so a resume reads last.safetensors from disk once."""

    path: Path
    meta: dict
    shapes: dict
    _data: bytes | None = field(default=None, repr=False)
    _tensors: dict | None = field(default=None, repr=False)

    @classmethod
    def read(cls, path) -> CheckpointFile:
        """One read of ``path``; its data checked against its digest before any tensor is
        decoded (a mismatch is a ``CheckpointError`` that says "corrupt", exit 1)."""
        path = _existing_file(Path(path))
        with open(path, "rb") as fh:
            data = fh.read()
        meta, shapes = _parse_header(path, data)
        _check_format(path, meta)
        n = int.from_bytes(data[:8], "little")
        try:
            check_digest(path, meta, data[8 + n :])
        except CorruptFile as exc:
            raise CheckpointError(str(exc)) from None
        return cls(path, meta, shapes, data)

    def tensors(self) -> dict:
        """Every tensor of the file (on the CPU), decoded once; the raw bytes are then dropped."""
        if self._tensors is None:
            from safetensors.torch import load as load_bytes

            try:
                self._tensors = load_bytes(self._data)
            except Exception as exc:
                raise CheckpointError(
                    f"{self.path}: cannot read tensors ({str(exc).splitlines()[0]})"
                ) from None
            self._data = None
        return self._tensors

    def release(self) -> None:
        """Drop the bytes and tensors (a resume holds the file only until it has restored)."""
        self._data = self._tensors = None


def _existing_file(path: Path) -> Path:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        kind = special_file(path)
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint file; refusing to open it"
            if kind
            else f"checkpoint not found: {path}"
        )
    return path


def _parse_header(path: Path, data: bytes) -> tuple[dict, dict]:
    """(metadata, tensor shapes) from a safetensors file's bytes: an 8-byte little-endian length,
    then that many bytes of JSON."""

    try:
        header, meta, _ = parse_header(data)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    shapes = {}
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(
                f"{path}: unreadable tensor header (tensor {key[:40]!r} has no valid shape)"
            )
        shapes[key] = tuple(shape)
    return meta, shapes


def _check_format(path: Path, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not an ncm checkpoint (no format={FORMAT})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(this ncm reads version {FORMAT_VERSION})"
        )
