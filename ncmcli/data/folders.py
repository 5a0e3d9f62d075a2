"""Image folders as data sets: root/train/<class>/* and root/test/<class>/* (or val/), the
layouts people have, checked and described in notes, decoded once into a cache or per batch."""

from __future__ import annotations

from pathlib import Path

import torch

from ncmcli.data.batching import FileSplit, Split
from ncmcli.data.foldercache import load_cached
from ncmcli.data.images import load_image
from ncmcli.errors import DataError

# torchvision's ImageFolder extensions: what a folder of photos holds (GIF placeholders are not)
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _list_split(folder: Path, index: dict, suffixes: tuple, skipped: dict, notes: list) -> tuple:
    """(image files, labels) of one split folder: its class subfolders' regular files with an
    image suffix; other files are counted in ``skipped`` by suffix, non-regular ones noted."""
    files, labels = [], []
    for cdir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if cdir.name not in index:
            raise DataError(f"{cdir}: class '{cdir.name}' is not among the training classes")
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() not in suffixes:
                if not f.is_dir():
                    skipped[f.suffix.lower() or "(none)"] = skipped.get(f.suffix.lower() or "(none)", 0) + 1
                continue
            if not f.is_file():
                notes.append(f"skipped {f}: not a regular file")
                continue
            files.append(f)
            labels.append(index[cdir.name])
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(suffixes)}; data.extensions chooses others)")
    return files, torch.tensor(labels, dtype=torch.int64)


def load_folder(
    root: Path,
    channels: int,
    size: int,
    want_train: bool,
    *,
    loader: str = "auto",
    budget_gb: float = 4.0,
    workers: int = 2,
    cache: bool = True,
    resize: str = "crop",
    test_dir: str = "",
    extensions: str = "",
    say=None,
) -> tuple:
    """root/train/<class>/* and root/test/<class>/* (or root/val/ when there is no test/, or
    ``test_dir``); class names are the folder names. Held in memory as uint8 (``loader:
    tensor``, or ``auto`` when the decoded images fit in ``budget_gb``), decoded once and
    cached (``foldercache``) unless ``cache`` is off; else decoded per batch by DataLoader
    workers. ``channels`` 0 means 1 when every sampled image is grayscale, else 3; ``size`` 0
    picks a side that suits the images (``probe_size``). Only regular files with an image
    extension are read: others are skipped with a note (a FIFO would block). Returns (train,
    test, classes, notes)."""

    notes: list[str] = []
    held_out = _held_out_dir(root, test_dir, notes)
    if want_train and not (root / "train").is_dir():
        raise DataError(f"image folder {root} has no train/ subfolder ({_subfolders(root)})")
    suffixes = _suffixes(extensions)
    train_dir = root / "train" if want_train else root / held_out
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{train_dir} needs at least 2 class folders, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    listed, skipped = {}, {}
    for split, folder in (("train", "train"), ("test", held_out)) if want_train else (("test", held_out),):
        listed[split] = _list_split(root / folder, index, suffixes, skipped, notes)
    if skipped:
        notes.append(
            f"skipped {sum(skipped.values())} files that are not images ("
            + ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items()))
            + "); data.extensions chooses others"
        )
    sample = listed["train" if want_train else "test"][0]
    if channels == 0:
        channels = 1 if all_grayscale(sample) else 3
        if channels == 1:
            notes.append("grayscale images: 1 channel (data.channels=3 reads them as RGB)")
    if size == 0:
        size, median = probe_size(sample, detail=True)
        notes.append(
            f"image size {size}x{size}: the median shorter side is {median} px"
            + (", kept within 8..64 for a CPU-sized net" if size != median else "")
            + "; set data.image_size=... to choose"
        )
    splits = {}
    for split, (files, targets) in listed.items():
        in_memory = loader == "tensor" or (
            loader == "auto" and len(files) * channels * size * size <= budget_gb * 2**30
        )
        if in_memory and cache:
            splits[split] = Split(
                load_cached(root, split, files, targets, channels, size, notes, resize, say=say), targets
            )
        elif in_memory:
            splits[split] = Split(
                torch.stack([load_image(f, channels, size, resize)[0] for f in files]), targets
            )
        else:
            splits[split] = FileSplit(files, targets, channels, size, workers, resize)
    return splits.get("train"), splits["test"], classes, notes  # data.py makes the Dataset


def _subfolders(root: Path) -> str:
    names = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())[:12]
    return f"it holds {', '.join(names)}" if names else "it holds no subfolders"


def _held_out_dir(root: Path, test_dir: str, notes: list[str]) -> str:
    """The held-out split's subfolder: ``test_dir`` if set, else test/, else val/ (with a note)."""
    if not root.is_dir():
        raise DataError(
            f"data.root {root} does not exist" if not root.exists() else f"data.root {root} is not a folder"
        )
    if test_dir:
        if not (root / test_dir).is_dir():
            raise DataError(
                f"data.test_dir={test_dir}: {root / test_dir} is not a folder ({_subfolders(root)})"
            )
        return test_dir
    if (root / "test").is_dir():
        return "test"
    if (root / "val").is_dir():
        notes.append(f"no test/ in {root}: val/ is the held-out split (data.test_dir names another)")
        return "val"
    raise DataError(
        f"image folder {root} needs train/<class>/ and test/<class>/ (or val/) subfolders; "
        f"{_subfolders(root)} (data.test_dir names the held-out one)"
    )


def all_grayscale(files: list[Path], sample: int = 32) -> bool:
    """Whether every one of up to ``sample`` evenly spread files is a grayscale image."""
    from PIL import Image

    step = max(1, len(files) // sample)
    modes = set()
    for f in files[::step][:sample]:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
        except Exception:  # an unreadable file fails later, with its own message
            continue
    return bool(modes) and modes <= {"L", "1", "I;16", "I;16B", "I;16L", "I", "LA"}


def probe_size(files: list[Path], sample: int = 32, detail: bool = False):
    """A square side that suits a folder's images: the median shorter side of up to
    ``sample`` evenly spread files, kept as it is when it is a multiple of 4 within [8, 64]
    (MNIST's 28), else rounded to a multiple of 8 and kept within [8, 64] (above 64 a
    CPU-sized run gets slow). ``detail``: (side, median) instead of the side."""
    from PIL import Image

    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step][:sample]:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # an unreadable file fails later, with its own message
            continue
    if not sides:
        return (32, 0) if detail else 32
    median = sorted(sides)[len(sides) // 2]
    side = median if median % 4 == 0 and 8 <= median <= 64 else int(min(64, max(8, 8 * round(median / 8))))
    return (side, median) if detail else side


def _suffixes(extensions: str) -> tuple[str, ...]:
    """``data.extensions`` ("png, .JPG") as lower-case suffixes; "" = ImageFolder's list."""
    given = (e if e.startswith(".") else f".{e}" for e in extensions.lower().replace(" ", "").split(","))
    return tuple(e for e in given if e != ".") or FOLDER_EXTENSIONS
