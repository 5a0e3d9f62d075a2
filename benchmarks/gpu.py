"""Benchmark 5 (GPU): images/s of each paper net (Table 1) in one precision, the model alone
and through ncm's data path, the achieved TFLOP/s against the device's peak, and the
projected 90-epoch time. Sized to finish in about a minute per precision on one GPU.

    python benchmarks/gpu.py [--precision fp32|bf16] [--peak-tflops N] [--steps 50] [--compile] [--json FILE]
    python benchmarks/gpu.py --dry-run      # tiny sizes on the CPU, to prove the script runs

Columns: "model img/s" steps on one batch already on the device (the net, the loss, the
optimiser: nothing else); "pipeline img/s" steps as `ncm train` feeds them (a uint8 split on
the device, a seeded order, batched augmentation, normalisation). Their gap is the data
path's cost. bf16 is autocast with channels_last, as `train.precision: auto` does on CUDA;
fp32 is what the paper presets use (`train.precision: fp32`, for the tables' rounding).

TF32: cuDNN runs fp32 convolutions on TF32 tensor cores unless
``torch.backends.cudnn.allow_tf32 = False`` (PyTorch's default is True), while fp32 matmuls
stay full fp32 unless ``torch.set_float32_matmul_precision("high")``. ncm leaves both at
PyTorch's defaults, so the paper presets' convolutions run in TF32 on Ampere and later.
The default peaks are an H100/H200 SXM's dense figures: 989 TFLOP/s bf16, 494 TF32 (fp32
convolutions), 67 plain fp32; pass --peak-tflops for another device.
"""

import argparse
import json
import time

import torch
from _common import Trainer, forward_flops, sync

from ncmcli.data.batching import Split, batches, channel_stats, normalize

NETS = [
    ("mnist", "mnist-encm", (1, 28, 28), 10, 60000),
    ("cifar10", "cifar10plus-encm", (3, 32, 32), 10, 50000),
    ("cifar100", "cifar100-encm", (3, 32, 32), 100, 50000),
]
PEAKS = {"bf16": 989.0, "fp32": 494.0}  # fp32: TF32 tensor cores, cuDNN's default for convolutions


def measure(tr, feed, steps: int, batch: int, dev, warmup: int = 5) -> float:
    """Images per second over ``steps`` steps after ``warmup`` steps (cudnn autotuning, compile)."""
    for i, (x, y) in enumerate(feed):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        tr.step(x, y)
    sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for this precision")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    steps, batch, warmup = (1, 4, 1) if args.dry_run else (args.steps, args.batch, 5)
    peak = args.peak_tflops or PEAKS[args.precision]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(
            f"device: {torch.cuda.get_device_name()}, {args.precision}, peak {peak:g} TFLOP/s; "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul precision {torch.get_float32_matmul_precision()}"
        )
    else:
        print(f"device: cpu, {args.precision} (dry run: tiny sizes, the numbers mean nothing)")
    print(
        f"{'net':9} {'GFLOP/img':>9} {'model img/s':>11} {'pipeline img/s':>14} {'TFLOP/s':>8} {'of peak':>8} "
        f"{'s/epoch':>8} {'90 epochs':>10}"
    )
    rows = []
    for arch, preset, shape, classes, n_train in NETS:
        amp = torch.bfloat16 if args.precision == "bf16" and dev.type == "cuda" else None
        fmt = torch.channels_last if args.precision == "bf16" else torch.contiguous_format
        tr = Trainer(preset, [], shape, classes, device=dev, amp=amp, memory_format=fmt, compile=args.compile)
        flops = 3 * forward_flops(tr.model, shape)  # forward + backward (about twice the forward)
        n = batch * (steps + 6)
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, classes, (n,), device=dev)
        mean, std = channel_stats(images[:256].cpu())
        x0, y0 = normalize(images[:batch], mean, std), labels[:batch]
        model_rate = measure(tr, ((x0, y0) for _ in range(steps + 6)), steps, batch, dev, warmup)
        feed = batches(
            Split(images, labels),
            batch,
            mean=mean,
            std=std,
            device=dev,
            generator=torch.Generator().manual_seed(0),
            augment_batches=tr.cfg.data.augment,
        )
        rate = measure(tr, feed, steps, batch, dev, warmup)
        tflops = rate * flops / 1e12
        epoch_s = n_train / rate
        rows.append(
            {
                "net": arch,
                "precision": args.precision,
                "gflop_per_image": flops / 1e9,
                "model_images_per_s": model_rate,
                "pipeline_images_per_s": rate,
                "tflops": tflops,
                "peak_tflops": peak,
                "epoch_s": epoch_s,
                "epochs90_min": 90 * epoch_s / 60,
            }
        )
        print(
            f"{arch:9} {flops / 1e9:9.2f} {model_rate:11.0f} {rate:14.0f} {tflops:8.1f} {tflops / peak:8.1%} "
            f"{epoch_s:8.1f} {90 * epoch_s / 60:8.1f} min"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(dev), "precision": args.precision, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
