"""What the integrity check costs: loading the largest paper net's checkpoint (the CIFAR-100
net of Table 1, with its optimiser state, as a resumable last.safetensors holds it) with and
without checking its sha256 digest, in one run.

    python benchmarks/digest_cost.py [--reps 5] [--dry-run]   # --dry-run: the tiny net, once
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ncmcli.nn import build_net
from ncmcli.storage import read_tensor_file, save_tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="the tiny net, one repetition (CI)")
    args = ap.parse_args()
    if args.dry_run:
        args.reps = 1
    net = build_net("tiny" if args.dry_run else "cifar100", in_channels=3, image_size=32)
    tensors = {f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    tensors.update(
        {f"momentum.{k}": torch.randn_like(v) for k, v in tensors.items() if v.is_floating_point()}
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.safetensors"
        save_tensors(path, tensors, {"format": "bench"})
        size = path.stat().st_size

        def timed(verify: bool) -> float:
            t = time.perf_counter()
            read_tensor_file(path, verify=verify).tensors()
            return time.perf_counter() - t

        timed(True)  # warm the page cache
        plain, checked = [], []
        for _ in range(args.reps):
            plain.append(timed(False))
            checked.append(timed(True))
    p, c = statistics.median(plain), statistics.median(checked)
    print(f"checkpoint: {size / 2**20:.1f} MiB ({len(tensors)} tensors)")
    print(f"load without the check: {p * 1000:.1f} ms (median of {args.reps})")
    print(f"load with the sha256 check: {c * 1000:.1f} ms")
    print(
        f"ratio: {c / p:.2f}x; the check adds {(c - p) * 1000:.1f} ms ({size / 2**20 / max(c - p, 1e-9):.0f} MiB/s)"
    )


if __name__ == "__main__":
    main()
