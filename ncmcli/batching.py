"""Batches from a split: a seeded per-epoch order, the CIFAR-10+ augmentation and
normalisation as batched tensor ops on the training device; the same index plan feeds a
DataLoader for image folders too large for memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ncmcli.images import load_image


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
    resize: str = "crop"

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "FileSplit":
        return self  # stays on disk

    def head(self, n: int) -> "FileSplit":
        return self if n <= 0 else self.subset(torch.arange(min(n, len(self))))

    def subset(self, idx: torch.Tensor) -> "FileSplit":
        return FileSplit([self.files[i] for i in idx.tolist()], self.labels[idx], self.channels, self.size,
                         self.workers, self.resize)

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
        self.files, self.channels, self.size, self.resize = split.files, split.channels, split.size, split.resize

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



def split_stats(split, sample: int = 10_000, *, normalization: str = "channel") -> tuple[list[float], list[float]]:
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


def channel_stats(images: torch.Tensor, *, per_channel: bool = True) -> tuple[list[float], list[float]]:
    """Per-channel (or, ``per_channel=False``, global) mean and std of a uint8 (N, C, H, W)
    split, in [0, 1] units; one value per channel either way."""
    x = images.to(torch.float64).div_(255.0)
    c = x.shape[1]
    if per_channel:
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    else:
        mean, std = x.mean().expand(c), x.std().expand(c)
    return mean.tolist(), std.clamp_min(1e-6).tolist()


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


RRC_SCALE, RRC_RATIO, RRC_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop defaults


def draw_resized_crop(batch: int, h: int, w: int, generator: torch.Generator):
    """RandomResizedCrop's boxes (B, 4) as (x1, y1, x2, y2) and flips (B,): an area share in
    [0.08, 1] and an aspect ratio in [3/4, 4/3] (log-uniform), the first of 10 tries that
    fits, else the whole image (torchvision falls back to a centre crop; for square images
    that is the whole image)."""
    area = h * w * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * torch.rand(batch, RRC_TRIES, generator=generator))
    lo, hi = torch.log(torch.tensor(RRC_RATIO))
    ratio = torch.exp(lo + (hi - lo) * torch.rand(batch, RRC_TRIES, generator=generator))
    cw, ch = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    u = torch.rand(batch, 2, generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    rows = torch.arange(batch)
    cw = torch.where(first >= 0, cw[rows, first.clamp_min(0)], torch.tensor(float(w)))
    ch = torch.where(first >= 0, ch[rows, first.clamp_min(0)], torch.tensor(float(h)))
    x1 = (u[:, 0] * (w - cw + 1)).floor().clamp(max=w - cw)
    y1 = (u[:, 1] * (h - ch + 1)).floor().clamp(max=h - ch)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], 1), flip


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each uint8 image to its box and resize it back to (H, W) bilinearly, all in one
    batched ``torchvision.ops.roi_align`` (one sample per output pixel: plain bilinear
    sampling at pixel centres, as torchvision's resized_crop does inside the box; on the
    outermost pixels it blends in the real neighbours instead of repeating the crop's edge),
    then flip where ``flip``."""
    from torchvision.ops import roi_align

    b, c, h, w = images.shape
    dev = images.device
    rois = torch.cat([torch.arange(b, dtype=torch.float32, device=dev)[:, None], boxes.to(dev, torch.float32)], 1)
    out = roi_align(images.float(), rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    out = torch.where(flip.to(dev)[:, None, None, None], out.flip(3), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def batches(
    split, batch_size: int, *, mean, std, device, generator: torch.Generator | None = None,
    augment_batches: bool | str = False, flip_batches: bool = False, skip: int = 0, rank: int = 0, world: int = 1,
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
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    plan = []  # (indices, augmentation draws) per batch this rank will see
    for i, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        pad = 4 if augment_batches else 0
        if augment_batches == "randomresizedcrop":
            draws = draw_resized_crop(size, *split.shape[1:], generator)
        else:
            draws = draw_augment(size, generator, pad) + (pad,) if augment_batches or flip_batches else None
        if i < skip or size < world:
            continue
        idx = order[start:start + size] if order is not None else torch.arange(start, start + size)
        if world > 1:
            idx = idx[rank::world]
            draws = tuple(d[rank::world] if torch.is_tensor(d) else d for d in draws) if draws is not None else None
        plan.append((idx, draws))
    if isinstance(split, FileSplit):
        raw = split.loader(device).run([idx.tolist() for idx, _ in plan])
    else:
        raw = (split.images[idx.to(split.images.device)] for idx, _ in plan)
    for (idx, draws), x in zip(plan, raw):
        x = x.to(device, non_blocking=True)
        if draws is not None:
            x = resized_crop(x, *draws) if len(draws) == 2 else augment(x, *draws)
        yield normalize(x, mean, std), split.labels[idx.to(split.labels.device)].to(device, non_blocking=True)
