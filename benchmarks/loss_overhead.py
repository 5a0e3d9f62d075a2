"""Benchmark 3: the NCM loss forward + backward as a share of a whole training step
(net forward + backward + SGD step), for C = 10/100 classes and d = 256/512.

    python benchmarks/loss_overhead.py
"""

import torch
from _common import Trainer, parse, timed

from ncmcli import NCMLoss, make_anchors


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    BATCH, REPS, LOSS_REPS = (8, 1, 1) if args.dry_run else (128, 3, 50)
    nets = (("tiny", 32),) if args.dry_run else (("cifar10", 256), ("cifar100", 512))
    print(f"threads: {torch.get_num_threads()}, batch {BATCH}")
    print(f"{'net':9} {'C':>4} {'d':>4} {'metric':>10} {'loss ms':>8} {'step ms':>8} {'share':>7}")
    for arch, d in nets:
        for c in (10,) if args.dry_run else (10, 100):
            tr = Trainer("cifar100-encm", [f"model.arch={arch}"], (3, 32, 32), c)
            x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, c, (BATCH,))
            step_s = timed(lambda: tr.step(x, y), reps=REPS)
            for metric in ("euclidean", "cosine"):
                loss_fn = NCMLoss(make_anchors("orthoplex" if c > d else "orthogonal", c, d), metric=metric)
                f = torch.randn(BATCH, d, requires_grad=True)

                def loss_only():
                    loss_fn(f, y).backward()

                loss_s = timed(loss_only, reps=LOSS_REPS)
                print(
                    f"{arch:9} {c:4d} {d:4d} {metric:>10} {1e3 * loss_s:8.3f} {1e3 * step_s:8.1f} "
                    f"{loss_s / step_s:7.2%}"
                )


if __name__ == "__main__":
    main()
