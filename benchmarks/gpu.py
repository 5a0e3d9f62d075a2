"""Benchmark 5 (GPU): images/s of each paper net (Table 1), achieved TFLOP/s against the
device's peak, seconds per epoch and a projected 90-epoch time. Sized to finish in a few
minutes on one GPU. Training steps run as `ncm train` runs them: bf16 autocast, channels_last,
cudnn.benchmark, NCM loss in fp32, data as a uint8 tensor on the GPU with batched augmentation.

    python benchmarks/gpu.py [--peak-tflops 989] [--steps 50] [--compile]
    python benchmarks/gpu.py --dry-run      # tiny sizes on the CPU, to prove the script runs

The peak defaults to 989 TFLOP/s (H100/H200 SXM dense BF16); pass your device's figure.
"""

import argparse
import time

import torch

from _common import Trainer, forward_flops, sync
from ncmcli.batching import Split, batches, channel_stats

NETS = [("mnist", "mnist-encm", (1, 28, 28), 10, 60000), ("cifar10", "cifar10plus-encm", (3, 32, 32), 10, 50000),
        ("cifar100", "cifar100-encm", (3, 32, 32), 100, 50000)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    steps, batch = (2, 8) if args.dry_run else (args.steps, args.batch)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()}, peak {args.peak_tflops:g} TFLOP/s (bf16 dense)")
    else:
        print("device: cpu (dry run: tiny sizes, the numbers mean nothing)")
    print(f"{'net':9} {'GFLOP/img':>9} {'img/s':>9} {'TFLOP/s':>8} {'of peak':>8} {'s/epoch':>8} {'90 epochs':>10}")
    for arch, preset, shape, classes, n_train in NETS:
        amp = torch.bfloat16 if dev.type == "cuda" else None
        tr = Trainer(preset, [], shape, classes, device=dev, amp=amp, memory_format=torch.channels_last,
                     compile=args.compile)
        cfg = tr.cfg
        flops = 3 * forward_flops(tr.model, shape)  # forward + backward (about twice the forward)
        n = batch * (steps + 5)
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=dev)
        split = Split(images, torch.randint(0, classes, (n,), device=dev))
        mean, std = channel_stats(images[:256].cpu())
        gen = torch.Generator().manual_seed(0)
        it = batches(split, batch, mean=mean, std=std, device=dev, generator=gen, augment_batches=cfg.data.augment)
        for i, (x, y) in enumerate(it):
            if i == 5:  # warm-up: cudnn autotuning, compilation
                sync(dev)
                t0 = time.perf_counter()
            tr.step(x, y)
        sync(dev)
        rate = steps * batch / (time.perf_counter() - t0)
        tflops = rate * flops / 1e12
        epoch_s = n_train / rate
        print(f"{arch:9} {flops / 1e9:9.2f} {rate:9.0f} {tflops:8.1f} {tflops / args.peak_tflops:8.1%} "
              f"{epoch_s:8.1f} {90 * epoch_s / 60:8.1f} min")


if __name__ == "__main__":
    main()
