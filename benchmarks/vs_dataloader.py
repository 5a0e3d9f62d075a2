"""Benchmark 2: ncm's in-memory tensor path against the ordinary pipeline, a torchvision
Dataset with per-sample transforms (pad 4 + random crop + flip, ToTensor, Normalize) in a
DataLoader with num_workers 0 and 2, training the same net on the same CIFAR-shaped data.

    python benchmarks/vs_dataloader.py
"""

import time

import torch
import torchvision.transforms as T
from _common import Trainer, parse
from torch.utils.data import DataLoader, Dataset

from ncmcli.data.batching import Split, batches, channel_stats


class PilCifar(Dataset):
    """What a typical training script does: one PIL image per sample, transformed in Python."""

    def __init__(self, images, labels, transform):
        from PIL import Image

        self.images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def rate(loader_fn, arch: str, epochs: int = 2) -> float:
    tr = Trainer("cifar10plus-encm", [f"model.arch={arch}"], (3, 32, 32), 10)
    t0 = seen = None
    for epoch in range(epochs):
        if epoch == 1:  # the first epoch warms up workers and allocators
            t0, seen = time.perf_counter(), 0
        for x, y in loader_fn():
            tr.step(x, y)
            if seen is not None:
                seen += len(y)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    N, BATCH = (64, 16) if args.dry_run else (2048, 128)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N,), generator=g)
    split = Split(images, labels)
    mean, std = channel_stats(images)
    tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )
    ds = PilCifar(images, labels, tf)
    gen = torch.Generator().manual_seed(1)
    ncm = lambda: batches(split, BATCH, mean=mean, std=std, device="cpu", generator=gen, augment_batches=True)
    print(f"threads: {torch.get_num_threads()}, {N} CIFAR-shaped images per epoch, batch {BATCH}")
    print(f"{'net':10} {'ncm img/s':>10} {'DL w=0':>8} {'DL w=2':>8} {'ratio w=0':>10} {'ratio w=2':>10}")
    for arch in ("tiny",) if args.dry_run else ("tiny", "cifar10"):
        ours = rate(ncm, arch)
        w0 = rate(lambda: DataLoader(ds, BATCH, shuffle=True, num_workers=0), arch)
        w2 = (
            w0
            if args.dry_run
            else rate(
                lambda: DataLoader(ds, BATCH, shuffle=True, num_workers=2, persistent_workers=False), arch
            )
        )
        print(f"{arch:10} {ours:10.1f} {w0:8.1f} {w2:8.1f} {ours / w0:10.2f} {ours / w2:10.2f}")


if __name__ == "__main__":
    main()
