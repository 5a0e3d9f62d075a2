"""Batches from a split: a seeded per-epoch order, the CIFAR-10+ augmentation and
normalisation as batched tensor ops on the training device; the same index plan feeds a
DataLoader for image folders too large for memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ncmcli.data.augment import augment, draw_augment, draw_resized_crop, resized_crop
from ncmcli.data.images import load_image


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, n: int) -> Split:
        return self if n <= 0 else Split(self.images[:n], self.labels[:n])

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])

    def shard(self, rank: int, world: int) -> Split:
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
    resize: str = "crop"

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> FileSplit:
        return self  # stays on disk

    def head(self, n: int) -> FileSplit:
        return self if n <= 0 else self.subset(torch.arange(min(n, len(self))))

    def subset(self, idx: torch.Tensor) -> FileSplit:
        return FileSplit(
            [self.files[i] for i in idx.tolist()],
            self.labels[idx],
            self.channels,
            self.size,
            self.workers,
            self.resize,
        )

    def shard(self, rank: int, world: int) -> FileSplit:
        """This rank's rows, as one FileSplit kept for the split's life: every evaluation under
        DDP reuses its DataLoader (and workers) instead of forking new ones each epoch."""
        shards = self.__dict__.setdefault("_shards", {})
        if (rank, world) not in shards:
            shards[(rank, world)] = self.subset(torch.arange(rank, len(self), world))
        return shards[(rank, world)]

    def close(self) -> None:
        """Stop the DataLoader workers of this split and its shards (also done when it is
        garbage-collected; explicit before another loader forks, so that no child process
        inherits a live loader)."""
        loader = self.__dict__.pop("_loader", None)
        if loader is not None:
            loader.close()
        for part in self.__dict__.pop("_shards", {}).values():
            part.close()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def loader(self, device) -> _PlannedLoader:
        if getattr(self, "_loader", None) is None:
            self._loader = _PlannedLoader(self, device)
        return self._loader


class _Files(torch.utils.data.Dataset):
    def __init__(self, split: FileSplit):
        self.files, self.channels, self.size, self.resize = (
            split.files,
            split.channels,
            split.size,
            split.resize,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.files[i], self.channels, self.size, self.resize)[0]


class _PlannedLoader:
    """One DataLoader per split, kept across epochs (persistent workers), fed each epoch
    with the index plan the tensor path would use."""

    def __init__(self, split: FileSplit, device):
        self.plan: list[list[int]] = []
        workers = split.workers
        self.loader = torch.utils.data.DataLoader(
            _Files(split),
            batch_sampler=self,
            num_workers=workers,
            pin_memory=torch.device(device).type == "cuda",
            persistent_workers=workers > 0,
            # Its own generator: a DataLoader otherwise draws its worker seed from the global
            # RNG, which would shift model initialisation and dropout against the tensor path.
            generator=torch.Generator().manual_seed(0),
        )

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    def run(self, plan: list[list[int]]):
        self.plan = plan
        return iter(self.loader)

    def close(self) -> None:
        # The last reference to the DataLoader (and its persistent iterator) goes, and the
        # iterator shuts its workers down from this, their parent, process.
        loader, self.loader = self.loader, None
        del loader


def split_stats(
    split, sample: int = 10_000, *, normalization: str = "channel"
) -> tuple[list[float], list[float]]:
    """``channel_stats`` of a split; a FileSplit is estimated from ``sample`` evenly spaced images.
    ``normalization="global"`` is the paper's: one mean and std over all pixels and channels,
    repeated per channel so that checkpoints and ``normalize`` keep one shape."""
    per_channel = normalization == "channel"
    if isinstance(split, Split):
        return channel_stats(split.images, per_channel=per_channel)
    idx = torch.linspace(0, len(split) - 1, min(sample, len(split))).round().long().unique()
    part = split.subset(idx)
    loader = part.loader("cpu")
    chunks = list(loader.run([list(range(i, min(i + 256, len(part)))) for i in range(0, len(part), 256)]))
    return channel_stats(torch.cat(chunks), per_channel=per_channel)


def channel_stats(
    images: torch.Tensor, *, per_channel: bool = True, chunk_values: int = 1 << 24
) -> tuple[list[float], list[float]]:
    """Per-channel (or, ``per_channel=False``, global) mean and std (unbiased, as torch.std) of a
    uint8 (N, C, H, W) split, in [0, 1] units; one value per channel either way.

    Exact integer sums of x and x^2 over chunks of about ``chunk_values`` pixels: no float copy
    of the split (a float64 one is 8 times its size), and no rounding until the last division."""
    n_img, c = images.shape[0], images.shape[1]
    per_image = max(1, images[0].numel()) if n_img else 1
    step = max(1, chunk_values // per_image)
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for start in range(0, n_img, step):
        chunk = images[start : start + step].to(torch.int32)
        s1 += chunk.sum((0, 2, 3), dtype=torch.int64).cpu()
        s2 += chunk.pow(2).sum((0, 2, 3), dtype=torch.int64).cpu()
    count = n_img * images.shape[2] * images.shape[3]
    sums = [(int(a), int(b), count) for a, b in zip(s1.tolist(), s2.tolist())]
    if not per_channel:
        sums = [(sum(a for a, _, _ in sums), sum(b for _, b, _ in sums), count * c)] * c
    mean = [a / n / 255.0 for a, _, n in sums]
    var = [(b - a * a / n) / max(n - 1, 1) / 255.0**2 for a, b, n in sums]
    return mean, [max(max(v, 0.0) ** 0.5, 1e-6) for v in var]


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 with zero mean and unit variance per channel. ``mean`` and
    ``std`` are lists, or (1, C, 1, 1) tensors in pixel units from ``pixel_stats`` (on the
    device: the step loop builds them once, not once per batch)."""
    if not torch.is_tensor(mean):
        mean, std = pixel_stats(mean, std, images.device)
    return (images.float() - mean) / std


def pixel_stats(mean: list[float], std: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` (in [0, 1] units) as (1, C, 1, 1) float32 tensors in pixel units
    on ``device``: one host-to-device copy each."""
    m = torch.tensor([255.0 * v for v in mean], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor([255.0 * v for v in std], dtype=torch.float32).view(1, -1, 1, 1)
    return to_device(m, device), to_device(s, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``, from pinned memory without blocking when that is CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batches(
    split,
    batch_size: int,
    *,
    mean,
    std,
    device,
    generator: torch.Generator | None = None,
    augment_batches: bool | str = False,
    flip_batches: bool = False,
    skip: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (x, y) batches; shuffled when a generator is given (a fresh order each call).
    ``augment_batches`` is CIFAR-10+'s pad-crop-flip; ``flip_batches`` alone mirrors only
    (Liu et al.'s plain CIFAR-10): the same draws with a padding of 0. ``augment_batches=
    "randomresizedcrop"`` is torchvision's RandomResizedCrop + flip instead, for photos.

    ``skip`` passes over the first batches (drawing their random numbers all the same), so a
    run resumed mid-epoch sees exactly the batches it would have seen. With ``world`` > 1
    (DDP) every rank draws the same global batch and keeps its share ``[rank::world]``; a
    final batch smaller than ``world`` is dropped on every rank alike. A ``FileSplit`` gets
    the same plan, decoded by its DataLoader."""
    pad = 4 if augment_batches else 0
    plan = _plan(split, batch_size, generator, augment_batches, flip_batches, skip, rank, world)
    if not plan:
        return
    # The epoch's order and draws go to the device in one copy each; every batch then slices them
    # there, so the step loop itself never copies from the host (nor waits for it).
    ends = torch.tensor([len(idx) for idx, _ in plan]).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    all_idx = to_device(torch.cat([idx for idx, _ in plan]), device)
    all_draws = (
        None
        if plan[0][1] is None
        else [to_device(torch.cat([d[k] for _, d in plan]), device) for k in range(len(plan[0][1]))]
    )
    mean_t, std_t = pixel_stats(mean, std, device)
    if isinstance(split, FileSplit):
        raw = split.loader(device).run([idx.tolist() for idx, _ in plan])
        labels = to_device(split.labels, device)
    else:
        raw = (split.images[all_idx[a:b].to(split.images.device)] for a, b in zip(starts, ends))
        labels = (
            split.labels if split.labels.device == torch.device(device) else to_device(split.labels, device)
        )
    for a, b, x in zip(starts, ends, raw):
        x = to_device(x, device)  # a no-op for a split already on the device
        if all_draws is not None:
            draws = [d[a:b] for d in all_draws]
            x = resized_crop(x, *draws) if len(draws) == 2 else augment(x, *draws, pad=pad)
        yield normalize(x, mean_t, std_t), labels[all_idx[a:b]]


def _plan(
    split, batch_size: int, generator, augment_batches, flip_batches: bool, skip: int, rank: int, world: int
):
    """(indices, augmentation draws) of each batch this rank will see, drawing the random
    numbers of every batch, skipped ones too, so that a resumed epoch sees the same batches."""
    n, pad = len(split), 4 if augment_batches else 0
    order = torch.randperm(n, generator=generator) if generator is not None else None
    plan = []  # (indices, augmentation draws) per batch this rank will see
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        if augment_batches == "randomresizedcrop":
            draws = draw_resized_crop(size, *split.shape[1:], generator)
        else:
            draws = draw_augment(size, generator, pad) if augment_batches or flip_batches else None
        if i < skip or size < world:
            continue
        idx = order[start : start + size] if order is not None else torch.arange(start, start + size)
        if world > 1:
            idx = idx[rank::world]
            draws = tuple(d[rank::world] for d in draws) if draws is not None else None
        plan.append((idx, draws))
    return plan
