"""Benchmark 6: the CPU-sized CIFAR net (`model.arch: cifar10-cpu`, Table 1's CIFAR-10 layout
at quarter width) against the paper's `cifar10` net: training images/s and the time of one
full CIFAR-10 epoch (50,000 images), for the losses of the study.

    python benchmarks/cpu_net.py [--batch 128] [--steps 20]
"""

import torch
from _common import Trainer, parse, timed


def main() -> None:
    args = parse(__doc__.splitlines()[0], batch=(int, 128, "batch size"), steps=(int, 20, "timed steps"))
    batch, steps = (8, 1) if args.dry_run else (args.batch, args.steps)
    print(f"threads: {torch.get_num_threads()}, batch {batch}, {steps} timed steps after 2 warm-up steps")
    print(f"{'net':12} {'loss':8} {'img/s':>8} {'s / 50k epoch':>14}")
    for arch in ("cifar10-cpu",) if args.dry_run else ("cifar10-cpu", "cifar10"):
        for loss in ("encm", "softmax"):
            tr = Trainer(f"cifar10-{loss}", [f"model.arch={arch}"], (3, 32, 32), 10)
            x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            rate = batch / timed(lambda: tr.step(x, y), reps=steps, warmup=2)
            print(f"{arch:12} {loss:8} {rate:8.0f} {50000 / rate:14.1f}")


if __name__ == "__main__":
    main()
