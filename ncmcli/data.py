"""Datasets as whole uint8 tensors in memory, and batches built from them.

Every supported dataset fits in memory (MNIST, Fashion-MNIST, CIFAR-10/100, the embedded
quickstart subset, small image folders), so each split is loaded once as (N, C, H, W)
uint8 and batched with tensor ops: no per-sample Python in the training loop.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ncmcli.errors import DataError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Debian's dataset-fashion-mnist package installs the real IDX files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
QUICKSTART_FILE = Path(__file__).resolve().parent / "quickstart" / "fashion-mnist-quickstart.safetensors.gz"
DATA_LICENSE_NOTE = "A class-balanced subset of Fashion-MNIST, (c) Zalando SE, MIT licence."
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, n: int) -> "Split":
        return self if n <= 0 else Split(self.images[:n], self.labels[:n])

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])

    def shard(self, rank: int, world: int) -> "Split":
        return Split(self.images[rank::world], self.labels[rank::world])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclass
class FileSplit:
    """A split too large for memory: image files, decoded per batch by DataLoader workers
    (pinned memory on CUDA, persistent workers). Batches go through the same index plan,
    augmentation and normalisation as an in-memory ``Split``."""

    files: list
    labels: torch.Tensor  # (N,) int64
    channels: int
    size: int
    workers: int = 2

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "FileSplit":
        return self  # stays on disk

    def head(self, n: int) -> "FileSplit":
        return self if n <= 0 else self.subset(torch.arange(min(n, len(self))))

    def subset(self, idx: torch.Tensor) -> "FileSplit":
        return FileSplit([self.files[i] for i in idx.tolist()], self.labels[idx], self.channels, self.size, self.workers)

    def shard(self, rank: int, world: int) -> "FileSplit":
        return self.subset(torch.arange(rank, len(self), world))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def loader(self, device) -> "_PlannedLoader":
        if getattr(self, "_loader", None) is None:
            self._loader = _PlannedLoader(self, device)
        return self._loader


class _Files(torch.utils.data.Dataset):
    def __init__(self, split: FileSplit):
        self.files, self.channels, self.size = split.files, split.channels, split.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.channels, self.size)[0]


class _PlannedLoader:
    """One DataLoader per split, kept across epochs (persistent workers), fed each epoch
    with the index plan the tensor path would use."""

    def __init__(self, split: FileSplit, device):
        self.plan: list[list[int]] = []
        workers = split.workers
        self.loader = torch.utils.data.DataLoader(
            _Files(split), batch_sampler=self, num_workers=workers,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0,
            # Its own generator: a DataLoader otherwise draws its worker seed from the global
            # RNG, which would shift model initialisation and dropout against the tensor path.
            generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    def run(self, plan: list[list[int]]):
        self.plan = plan
        return iter(self.loader)


@dataclass
class Dataset:
    name: str
    train: Split | None
    test: Split
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.shape


def default_root() -> Path:
    """$NCM_DATA, else $XDG_CACHE_HOME/ncm/data, else ~/.cache/ncm/data."""
    if os.environ.get("NCM_DATA"):
        return Path(os.environ["NCM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ncm" / "data"


def load_dataset(data_cfg, *, train: bool = True) -> Dataset:
    """Both splits of ``data_cfg.name`` (``train=False`` skips the training split)."""
    root = Path(data_cfg.root).expanduser() if data_cfg.root else default_root()
    name = data_cfg.name
    if name == "quickstart":
        ds = _quickstart()
    elif name in ("mnist", "fashion-mnist"):
        ds = _mnist_like(name, root, data_cfg.download, train)
    elif name in ("cifar10", "cifar100"):
        ds = _cifar(name, root, data_cfg.download, train)
    elif name == "folder":
        ds = _folder(root, data_cfg.channels or 3, data_cfg.image_size or 32, train,
                     loader=data_cfg.loader, budget_gb=data_cfg.memory_budget_gb, workers=data_cfg.workers)
    else:  # the config schema already refuses other names
        raise DataError(f"unknown dataset {name!r}")
    return Dataset(
        ds.name,
        ds.train.head(data_cfg.limit_train) if ds.train is not None else None,
        ds.test.head(data_cfg.limit_test),
        ds.classes,
    )


# ---------------------------------------------------------------------------------------
# Formats

def _quickstart() -> Dataset:
    from safetensors.torch import load

    t = load(gzip.decompress(QUICKSTART_FILE.read_bytes()))
    return Dataset("quickstart", Split(t["train_images"], t["train_labels"].long()),
                   Split(t["test_images"], t["test_labels"].long()), list(FASHION_CLASSES))


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
        splits[split] = Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    classes = [str(i) for i in range(10)] if name == "mnist" else list(FASHION_CLASSES)
    return Dataset(name, splits.get("train"), splits["test"], classes)


def _download(name: str, root: Path, download: bool, folder: Path, expected: list[str]) -> None:
    """Fetch with torchvision (progress bar on stderr), or explain exactly what is missing."""
    hint = (
        f"{name} not found in {folder} (expected {', '.join(expected)}, plain or .gz)"
        + ("" if name != "fashion-mnist" else f" nor in {DEBIAN_FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    )
    if not download:
        raise DataError(f"{hint}; downloading is off (data.download=false): put the files there, or set data.root")
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
    expected = (["data_batch_1..5", "test_batch", "batches.meta"] if name == "cifar10"
                else ["train", "test", "meta"])
    if not all((folder / f).is_file() for f, _ in klass.train_list + klass.test_list + [(klass.meta["filename"], "")]):
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
        raise DataError(f"{name} in {folder} is unreadable ({str(exc).splitlines()[0]}); delete it to re-download") from None
    return Dataset(name, splits.get("train"), splits["test"], classes)


def _folder(root: Path, channels: int, size: int, want_train: bool, *, loader: str = "auto",
            budget_gb: float = 4.0, workers: int = 2) -> Dataset:
    """root/train/<class>/* and root/test/<class>/*; class names are the folder names.
    Held in memory as uint8 (``loader: tensor``, or ``auto`` when the decoded images fit in
    ``budget_gb``), else decoded per batch by DataLoader workers."""
    if not (root / "train").is_dir() and want_train or not (root / "test").is_dir():
        raise DataError(f"image folder {root} must hold train/<class>/ and test/<class>/ subfolders")
    train_dir = root / "train" if want_train else root / "test"
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{train_dir} needs at least 2 class folders, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test") if want_train else ("test",):
        files, labels = [], []
        for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if cdir.name not in index:
                raise DataError(f"{cdir}: class '{cdir.name}' is not among the training classes")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(index[cdir.name])
        if not files:
            raise DataError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        targets = torch.tensor(labels, dtype=torch.int64)
        in_memory = loader == "tensor" or (loader == "auto" and len(files) * channels * size * size <= budget_gb * 2**30)
        if in_memory:
            splits[split] = Split(torch.stack([load_image(f, channels, size)[0] for f in files]), targets)
        else:
            splits[split] = FileSplit(files, targets, channels, size, workers)
    return Dataset("folder", splits.get("train"), splits["test"], classes)


# A 64-megapixel cap keeps a decompression bomb from exhausting memory: PIL refuses larger.
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: Path, channels: int, size: int) -> tuple[torch.Tensor, bool]:
    """(C, size, size) uint8 from any PIL-readable file, and whether it was resized."""
    import warnings

    from PIL import Image

    from ncmcli.errors import ImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2  # PIL errors at twice this value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path}: image of {im.width}x{im.height} pixels is too large")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)  # 16-bit grayscale: scale to 8 bits
                    im = Image.fromarray((arr * (255.0 / max(arr.max(), 1))).astype(np.uint8))
                if im.mode in ("RGBA", "LA", "P", "PA") or im.info.get("transparency") is not None:
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # composite alpha on black
                    im = Image.alpha_composite(bg, im)
                im = im.convert("L" if channels == 1 else "RGB")
                resized = im.size != (size, size)
                if resized:
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image is too large (decompression bomb guard)") from None
    except Exception as exc:
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__})") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.contiguous(), resized


# ---------------------------------------------------------------------------------------
# Batches

def split_stats(split, sample: int = 10_000) -> tuple[list[float], list[float]]:
    """``channel_stats`` of a split; a FileSplit is estimated from ``sample`` evenly spaced images."""
    if isinstance(split, Split):
        return channel_stats(split.images)
    idx = torch.linspace(0, len(split) - 1, min(sample, len(split))).round().long().unique()
    part = split.subset(idx)
    loader = part.loader("cpu")
    chunks = list(loader.run([list(range(i, min(i + 256, len(part)))) for i in range(0, len(part), 256)]))
    return channel_stats(torch.cat(chunks))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) split, in [0, 1] units."""
    x = images.to(torch.float64).div_(255.0)
    dims = (0, 2, 3)
    mean = x.mean(dims)
    std = x.std(dims).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 with zero mean and unit variance per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - m) / s


def draw_augment(batch: int, generator: torch.Generator, pad: int = 4):
    """Random draws for ``augment``: crop offsets (B,), (B,) in [0, 2*pad] and flips (B,)."""
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return oy, ox, flip


def augment(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor,
            pad: int = 4) -> torch.Tensor:
    """The CIFAR-10+ augmentation on a uint8 batch: zero-pad ``pad`` pixels in pixel space
    (as torchvision's RandomCrop(padding=4) does; padding after normalisation would pad with
    the mean instead), crop the original size at (oy, ox), then flip where ``flip``."""
    b, c, h, w = images.shape
    dev = images.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def batches(
    split, batch_size: int, *, mean, std, device, generator: torch.Generator | None = None,
    augment_batches: bool = False, skip: int = 0, rank: int = 0, world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (x, y) batches; shuffled when a generator is given (a fresh order each call).

    ``skip`` passes over the first batches (drawing their random numbers all the same), so a
    run resumed mid-epoch sees exactly the batches it would have seen. With ``world`` > 1
    (DDP) every rank draws the same global batch and keeps its share ``[rank::world]``; a
    final batch smaller than ``world`` is dropped on every rank alike. A ``FileSplit`` gets
    the same plan, decoded by its DataLoader."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    plan = []  # (indices, augmentation draws) per batch this rank will see
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        draws = draw_augment(size, generator) if augment_batches else None
        if i < skip or size < world:
            continue
        idx = order[start:start + size] if order is not None else torch.arange(start, start + size)
        if world > 1:
            idx = idx[rank::world]
            draws = tuple(d[rank::world] for d in draws) if draws is not None else None
        plan.append((idx, draws))
    if isinstance(split, FileSplit):
        raw = split.loader(device).run([idx.tolist() for idx, _ in plan])
    else:
        raw = (split.images[idx.to(split.images.device)] for idx, _ in plan)
    for (idx, draws), x in zip(plan, raw):
        x = x.to(device, non_blocking=True)
        if draws is not None:
            x = augment(x, *draws)
        yield normalize(x, mean, std), split.labels[idx.to(split.labels.device)].to(device, non_blocking=True)
