"""Benchmark: decoding an image folder at 224 px, as `data.loader=dataloader` does it (2
DataLoader workers, the split's batch plan), before and after JPEG draft mode.

    python benchmarks/decode.py [--size 224] [--images 192]

"before" is ``ncmcli.data.images.load_image`` with its two new steps switched off, i.e. ncm's
previous decode (a full-size JPEG decode, then one bilinear resize to the shorter side and a
centre crop); "after" is ``load_image`` as it is (libjpeg's scaled DCT decoding to the
smallest 1/2, 1/4 or 1/8 size that still covers the resize, then PIL's reducing_gap resize). The JPEGs are photos in all but name: real CIFAR-10 pictures
from $CIFAR10_DIR/train when set (else random smooth images), upscaled to each source size,
with mild sensor noise, saved at quality 90 (0.1-0.2 bytes per pixel, like camera JPEGs).
The ratio depends on the source size: a source under twice the target decodes at full size.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import parse

from ncmcli.data.batching import FileSplit


def make_photos(folder: Path, n: int, w: int, h: int) -> list[Path]:
    from PIL import Image

    root = os.environ.get("CIFAR10_DIR")  # real photos to upscale, when there
    cifar = sorted(Path(root).glob("train/*/*.jpg"))[:n] if root else []
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        if cifar:
            base = Image.open(cifar[i % len(cifar)]).convert("RGB").resize((w, h), Image.BICUBIC)
        else:
            small = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
            base = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base).astype(np.float64) + rng.normal(0, 4, (h, w, 3))
        path = folder / f"{w}x{h}-{i:04d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        files.append(path)
    return files


def rate(files: list[Path], size: int, workers: int, batch: int, *, draft: bool) -> float:
    """Images per second through FileSplit's DataLoader (second pass: workers warm), with
    ``load_image`` as it is (``draft``) or as it was before draft mode (full-size decode, a
    plain bilinear resize): the same function, the two new steps switched off."""
    from ncmcli.data import images

    split = FileSplit(files, torch.zeros(len(files), dtype=torch.int64), 3, size, workers)
    plan = [list(range(i, min(i + batch, len(files)))) for i in range(0, len(files), batch)]
    saved = images._draft, images.REDUCING_GAP
    if not draft:  # module globals, read at each call: the workers forked below see them
        images._draft, images.REDUCING_GAP = (lambda *a: None), None
    try:
        loader = split.loader("cpu")
        for _ in loader.run(plan):  # warm-up: start the workers, fill the page cache
            pass
        t0 = time.perf_counter()
        n = sum(len(x) for x in loader.run(plan))
        return n / (time.perf_counter() - t0)
    finally:
        images._draft, images.REDUCING_GAP = saved
        split.close()  # its workers stop here, before the next loader forks its own


def main() -> None:
    args = parse(
        __doc__.splitlines()[0],
        size=(int, 224, "target side in pixels"),
        images=(int, 192, "JPEGs per source size"),
    )
    size, n = (32, 8) if args.dry_run else (args.size, args.images)
    sources = [(64, 48), (160, 120)] if args.dry_run else [(500, 375), (1024, 768), (2048, 1536)]
    print(f"decode to {size} px (shorter side, centre crop), 2 DataLoader workers, {n} JPEGs per source size")
    print(f"{'source':>10} {'bytes/px':>8} {'before img/s':>12} {'after img/s':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in sources:
            files = make_photos(Path(tmp), n, w, h)
            bpp = sum(f.stat().st_size for f in files) / (n * w * h)
            before = rate(files, size, 2, 32, draft=False)
            after = rate(files, size, 2, 32, draft=True)
            print(f"{w}x{h:<5} {bpp:>8.2f} {before:>12.1f} {after:>11.1f} {after / before:>5.2f}x")


if __name__ == "__main__":
    main()
