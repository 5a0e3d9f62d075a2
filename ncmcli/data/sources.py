"""Where each built-in data set's images come from: the embedded quickstart subset, MNIST and
Fashion-MNIST (IDX files, Debian's package or a torchvision download), CIFAR-10/100 (the
official archives) and image folders. Each builder returns both splits as a ``Dataset``;
``datasets.load_dataset`` applies the class choice, limits, long tail and validation split."""

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
from ncmcli.data.folders import load_folder
from ncmcli.errors import ConfigError, DataError

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


def quickstart(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _quickstart()


def mnist_like(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _mnist_like(data_cfg.name, root, data_cfg.download, train)


def cifar(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    return _cifar(data_cfg.name, root, data_cfg.download, train)


def folder(data_cfg, root: Path, train: bool, say=None) -> Dataset:
    if not data_cfg.root:
        raise ConfigError(
            "data.name=folder needs data.root=PATH, a folder with train/<class>/ and "
            "test/<class>/ subfolders (e.g. --preset folder --set data.root=PATH)"
        )

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


# One builder per name in registry.DATASETS (a test checks they agree):
# (data config, root, train, say) -> Dataset.
DATASET_BUILDERS = {
    "quickstart": quickstart,
    "mnist": mnist_like,
    "fashion-mnist": mnist_like,
    "cifar10": cifar,
    "cifar100": cifar,
    "folder": folder,
}
