"""Datasets: MNIST, Fashion-MNIST, CIFAR-10/100, image folders and the embedded quickstart
subset, each split loaded once as an (N, C, H, W) uint8 tensor (``batching.Split``), or, for
image folders too large for memory, as a list of files (``batching.FileSplit``)."""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ncmcli.data.batching import Split
from ncmcli.data.subsets import (  # noqa: F401 (re-exported)
    choose_classes,  # noqa: F401 (keep_classes re-exported)
    imbalanced_indices,
    parse_imbalance,
    stratified_indices,
)
from ncmcli.errors import DataError

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Where Debian's dataset-fashion-mnist package installs the real IDX files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
QUICKSTART_FILE = (
    Path(__file__).resolve().parents[1] / "quickstart" / "fashion-mnist-quickstart.safetensors.gz"
)
DATA_LICENSE_NOTE = "A class-balanced subset of Fashion-MNIST, (c) Zalando SE, MIT licence."
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    name: str
    train: Split | None
    test: Split
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # for the user: subsets, caches, skipped files
    val: Split | None = None  # held out of train when data.val_split is set
    imbalance: str = ""  # the data.imbalance profile applied to train ("" = none)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.shape

    @property
    def train_counts(self) -> list[int] | None:
        """Training images per class (after limits, imbalance and the validation split)."""
        if self.train is None:
            return None
        return torch.bincount(self.train.labels.cpu(), minlength=len(self.classes)).tolist()


def worker_count(setting: int, env=os.environ) -> int:
    """``data.workers``: the number given, or for -1 one per CPU core available to this
    process (at most 16), divided among the torchrun ranks on this machine (at least 1)."""
    if setting >= 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(16, cores) // ranks)


def default_root() -> Path:
    """$NCM_DATA, else $XDG_CACHE_HOME/ncm/data, else ~/.cache/ncm/data."""
    if os.environ.get("NCM_DATA"):
        return Path(os.environ["NCM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ncm" / "data"


def load_dataset(
    data_cfg,
    *,
    train: bool = True,
    say=None,
    known_classes: list[str] | None = None,
    class_order: list[str] | None = None,
) -> Dataset:
    """Both splits of ``data_cfg.name`` (``train=False`` skips the training split). ``say``
    (a message callback) hears of long waits, such as a folder's first decode, before them.

    Classes: ``data.classes``, or with ``class_order`` exactly these names in this order (a
    checkpoint's classes), or with ``known_classes`` (an ``--extend`` run) those first and the
    ``data.classes`` after them, the training split holding only the new ones."""
    from ncmcli import registry

    root = Path(data_cfg.root).expanduser() if data_cfg.root else default_root()
    entry = registry.DATASETS.get(data_cfg.name)
    if entry is None:  # the config schema already refuses other names
        raise DataError(f"unknown dataset {data_cfg.name!r}")
    ds = entry.build(data_cfg, root, train, say)
    notes = list(ds.notes)
    if data_cfg.classes or known_classes is not None or class_order is not None:
        ds = choose_classes(ds, data_cfg, known_classes, class_order)
        shown = ds.classes[len(known_classes or []) :]
        how = (
            f"{len(known_classes)} from the checkpoint + {len(shown)} new"
            if known_classes
            else f"{len(shown)} kept"
        )
        notes.append(
            f"classes: {how} (data.classes): {', '.join(shown[:10])}" + (", ..." if len(shown) > 10 else "")
        )
    splits = {}
    for split_name, split, limit in (
        ("train", ds.train, data_cfg.limit_train),
        ("test", ds.test, data_cfg.limit_test),
    ):
        if split is None:
            splits[split_name] = None
            continue
        if limit and limit < len(split):
            split = split.subset(stratified_indices(split.labels, limit, seed=data_cfg.subset_seed))
            notes.append(
                f"{split_name}: a stratified sample of {len(split)} images (data.subset_seed={data_cfg.subset_seed})"
            )
        first = (
            len(known_classes) if known_classes is not None and split_name == "train" else 0
        )  # new ones only
        missing = sorted(set(range(first, len(ds.classes))) - set(split.labels.unique().tolist()))
        if missing:
            names = ", ".join(ds.classes[i] for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            notes.append(
                f"warning: the {split_name} split has no images of {len(missing)} "
                f"class{'es' if len(missing) > 1 else ''}: {names}"
            )
        splits[split_name] = split
    val = None
    if splits["train"] is not None and data_cfg.imbalance:
        splits["train"] = _long_tail(splits["train"], len(ds.classes), data_cfg, notes)
    if splits["train"] is not None and data_cfg.val_split:
        splits["train"], val = _hold_out(splits["train"], data_cfg, notes)
    return Dataset(ds.name, splits["train"], splits["test"], ds.classes, notes, val, data_cfg.imbalance)


def _long_tail(train, num_classes: int, data_cfg, notes: list[str]):
    """The ``data.imbalance`` profile applied to the training split."""
    kind, factor = parse_imbalance(data_cfg.imbalance)
    keep = imbalanced_indices(train.labels, num_classes, kind, factor, seed=data_cfg.subset_seed)
    train = train.subset(keep)
    counts = torch.bincount(train.labels, minlength=num_classes).tolist()
    notes.append(
        f"train: long-tailed ({data_cfg.imbalance}, data.subset_seed={data_cfg.subset_seed}), "
        f"{len(keep)} images; per class: {', '.join(map(str, counts))}"
    )
    return train


def _hold_out(train, data_cfg, notes: list[str]):
    """(train, validation): ``data.val_split`` images held out of train, stratified, seeded."""
    n_val = int(data_cfg.val_split) if data_cfg.val_split >= 1 else round(data_cfg.val_split * len(train))
    if not 1 <= n_val < len(train):
        raise DataError(
            f"data.val_split={data_cfg.val_split:g} leaves {n_val} of {len(train)} "
            "training images for validation; it needs at least 1 and must leave some to train on"
        )
    val_idx = stratified_indices(train.labels, n_val, seed=data_cfg.subset_seed + 1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    val = train.subset(val_idx)
    notes.append(
        f"validation: {len(val)} images held out of train (stratified); best.safetensors is "
        "selected on them" + (" (when there are at least 50)" if len(val) < 50 else "")
    )
    return train.subset(keep.nonzero().flatten()), val


# ---------------------------------------------------------------------------------------
# Formats

# The registered data sets (registry.DATASETS): (data config, root, train, say) -> Dataset.


def quickstart(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _quickstart()


def mnist_like(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _mnist_like(data_cfg.name, root, data_cfg.download, train)


def cifar(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _cifar(data_cfg.name, root, data_cfg.download, train)


def folder(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    if not data_cfg.root:
        from ncmcli.errors import ConfigError

        raise ConfigError(
            "data.name=folder needs data.root=PATH, a folder with train/<class>/ and "
            "test/<class>/ subfolders (e.g. --preset folder --set data.root=PATH)"
        )
    from ncmcli.data.folders import load_folder

    return Dataset(
        "folder",
        *load_folder(
            root,
            data_cfg.channels,
            data_cfg.image_size,
            train,
            loader=data_cfg.loader,
            budget_gb=data_cfg.memory_budget_gb,
            workers=worker_count(data_cfg.workers),
            cache=data_cfg.cache,
            resize=data_cfg.resize,
            test_dir=data_cfg.test_dir,
            extensions=data_cfg.extensions,
            say=say,
        ),
    )


def _quickstart() -> Dataset:
    from safetensors.torch import load

    t = load(gzip.decompress(QUICKSTART_FILE.read_bytes()))
    return Dataset(
        "quickstart",
        Split(t["train_images"], t["train_labels"].long()),
        Split(t["test_images"], t["test_labels"].long()),
        list(FASHION_CLASSES),
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: IDX data has {len(raw) - header} bytes, header says {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for cand in (d / stem, d / f"{stem}.gz"):
            if cand.is_file():
                return cand
    return None


def _mnist_like(name: str, root: Path, download: bool, want_train: bool) -> Dataset:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    raw_dir = root / folder / "raw"  # torchvision's layout, so its downloads land here
    dirs = [raw_dir] + ([DEBIAN_FASHION_DIR] if name == "fashion-mnist" else [])
    needed = [s for split in (["train", "test"] if want_train else ["test"]) for s in _IDX_FILES[split]]
    if any(_find(dirs, s) is None for s in needed):
        _download(name, root, download, raw_dir, needed)
    splits = {}
    for split in ("train", "test"):
        if split == "train" and not want_train:
            continue
        img_path, lbl_path = (_find(dirs, s) for s in _IDX_FILES[split])
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{img_path}: images {images.shape} do not match labels {labels.shape}")
        splits[split] = Split(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    classes = [str(i) for i in range(10)] if name == "mnist" else list(FASHION_CLASSES)
    return Dataset(name, splits.get("train"), splits["test"], classes)


def _download(name: str, root: Path, download: bool, folder: Path, expected: list[str]) -> None:
    """Fetch with torchvision (progress bar on stderr), or explain exactly what is missing."""
    hint = f"{name} not found in {folder} (expected {', '.join(expected)}, plain or .gz)" + (
        ""
        if name != "fashion-mnist"
        else f" nor in {DEBIAN_FASHION_DIR} (apt-get install dataset-fashion-mnist)"
    )
    if not download:
        raise DataError(
            f"{hint}; downloading is off (data.download=false): put the files there, or set data.root"
        )
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}.get(name) or _cifar_class(name)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints; stdout is for data
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{hint}; download failed ({reason}). Offline? Copy the files there from a machine "
            f"with internet (e.g. run the same command there and copy {root}), or set data.root / $NCM_DATA"
        ) from None


def _cifar_class(name: str):
    """torchvision's CIFAR class for ``name``, checking that files exist rather than
    re-hashing ~170 MB on every load (the download itself is md5-checked)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class Cifar(base):
        meta = {**base.meta, "md5": None}  # md5=None: torchvision checks existence only

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

    return Cifar


def _cifar(name: str, root: Path, download: bool, want_train: bool) -> Dataset:
    klass = _cifar_class(name)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    expected = (
        ["data_batch_1..5", "test_batch", "batches.meta"] if name == "cifar10" else ["train", "test", "meta"]
    )
    if not all(
        (folder / f).is_file() for f, _ in klass.train_list + klass.test_list + [(klass.meta["filename"], "")]
    ):
        _download(name, root, download, folder, expected)
    splits = {}
    try:
        for split in ("train", "test") if want_train else ("test",):
            # The one place ncm reads pickles: the official CIFAR archives are pickles.
            ds = klass(str(root), train=split == "train", download=False)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            splits[split] = Split(images, torch.as_tensor(ds.targets, dtype=torch.int64))
            classes = list(ds.classes)
    except Exception as exc:
        raise DataError(
            f"{name} in {folder} is unreadable ({str(exc).splitlines()[0]}); delete it to re-download"
        ) from None
    return Dataset(name, splits.get("train"), splits["test"], classes)
