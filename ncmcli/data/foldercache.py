"""Image folders decoded once: a split of small image files becomes one uint8 tensor, cached
as safetensors (never pickle) and keyed to the folder's contents, so that a second run on
60,000 JPEGs starts in seconds.

The key is a SHA-256 over every image's relative path, size and modification time, plus the
decoded channels and size. A cache whose key no longer matches (files added, removed or
changed) is rebuilt; a cache file that cannot be read is ignored, rebuilt, and reported in
the returned notes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ncmcli.data.images import DECODER_VERSION, load_image
from ncmcli.storage import (
    CorruptFile,
    cache_dir,
    read_tensor_file,
    remove_stale_temps,
    save_tensors,
)

FORMAT = "ncm-folder-cache/2"


def content_key(root: Path, files: list[Path], channels: int, size: int, resize: str = "crop") -> str:
    """What the decoded tensor depends on: every file's path (relative to ``root``), byte size
    and modification time, the decoding's channels and size, and the decoder's version."""

    h = hashlib.sha256(f"{FORMAT}|{channels}|{size}|{resize}|{len(files)}|decoder{DECODER_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_path(root: Path, split: str, channels: int, size: int, resize: str = "crop") -> Path:
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "folders" / f"{where}-{split}-{channels}x{size}-{resize}.safetensors"


def decode_all(
    files: list[Path], channels: int, size: int, threads: int | None = None, resize: str = "crop"
) -> torch.Tensor:
    """(N, C, size, size) uint8. PIL releases the GIL while decoding, so threads help."""
    threads = threads or min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(lambda f: load_image(f, channels, size, resize)[0], files, chunksize=256))
    return torch.stack(images) if images else torch.zeros(0, channels, size, size, dtype=torch.uint8)


def load_cached(
    root: Path,
    split: str,
    files: list[Path],
    labels: torch.Tensor,
    channels: int,
    size: int,
    notes: list[str],
    resize: str = "crop",
    say=None,
) -> torch.Tensor:
    """The decoded images of ``files``, from the cache when it matches the folder, else
    decoded now and cached. Cache problems never fail a run: they become ``notes``."""
    key = content_key(root, files, channels, size, resize)
    path = cache_path(root, split, channels, size, resize)
    if path.exists():
        cached = _from_cache(path, key, root / split, files, labels, channels, size, notes)
        if cached is not None:
            return cached
    if say is not None:  # before the wait, not after it
        say(
            f"decoding {len(files):,} images of {root / split} into the cache (once; later runs load it in seconds)"
        )
    t0 = time.time()
    images = decode_all(files, channels, size, resize=resize)
    if say is not None:
        say(f"decoded {len(files):,} images in {time.time() - t0:.1f} s")
    meta = {
        "format": FORMAT,
        "key": key,
        "root": str(root.resolve()),
        "split": split,
        "files": str(len(files)),
        "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
    }
    try:
        save_tensors(
            path,
            {"images": images.contiguous(), "labels": labels.contiguous()},
            {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()},
        )
    except OSError as exc:
        notes.append(f"cannot write the folder cache {path} ({exc.strerror}); the next run decodes again")
    return images


def _from_cache(path: Path, key: str, folder: Path, files, labels, channels: int, size: int, notes: list):
    """The cached images when the cache is whole (its digest) and matches the folder (its key,
    shapes and labels); else None, with a note saying why it is rebuilt."""
    remove_stale_temps(path.parent)  # of cache writers killed mid-write
    try:
        f = read_tensor_file(path, note_undigested=False)
        if f.meta.get("format") == FORMAT and f.meta.get("key") == key and f.digest is not None:
            tensors = f.tensors()
            images, cached_labels = tensors["images"], tensors["labels"]
            if (
                images.dtype == torch.uint8
                and tuple(images.shape) == (len(files), channels, size, size)
                and torch.equal(cached_labels, labels)
            ):
                return images
            notes.append(f"folder cache {path} does not match its key; rebuilding it")
        elif f.digest is None:
            notes.append(f"folder cache {path} carries no digest (an older ncm wrote it); rebuilding it")
        else:
            notes.append(f"{folder} changed since it was cached; decoding it again")
    except CorruptFile:
        notes.append(f"folder cache {path} is corrupt (its data does not match its digest); rebuilding it")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        notes.append(f"folder cache {path} is unreadable ({reason[:80]}); rebuilding it")
    return None
