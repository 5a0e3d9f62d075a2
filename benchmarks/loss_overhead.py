"""Benchmark 3: the NCM loss forward + backward as a share of a whole training step
(net forward + backward + SGD step), for C = 10/100 classes and d = 256/512.

    python benchmarks/loss_overhead.py
"""

import time

import torch

from ncmcli import NCMLoss, make_anchors
from ncmcli.config import resolve
from ncmcli.schedules import make_optimizer
from ncmcli.training import build_from_config

BATCH, REPS = 128, 3


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    print(f"threads: {torch.get_num_threads()}, batch {BATCH}")
    print(f"{'net':9} {'C':>4} {'d':>4} {'metric':>10} {'loss ms':>8} {'step ms':>8} {'share':>7}")
    for arch, d in (("cifar10", 256), ("cifar100", 512)):
        for c in (10, 100):
            cfg = resolve("cifar100-encm", [f"model.arch={arch}"])
            torch.manual_seed(0)
            model, _, crit = build_from_config(cfg, c, (3, 32, 32))
            opt = make_optimizer(cfg, model, crit)
            x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, c, (BATCH,))

            def step():
                loss = crit(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step_s = timed(step, REPS)
            for metric in ("euclidean", "cosine"):
                loss_fn = NCMLoss(make_anchors("orthoplex" if c > d else "orthogonal", c, d), metric=metric)
                f = torch.randn(BATCH, d, requires_grad=True)

                def loss_only():
                    loss_fn(f, y).backward()

                loss_s = timed(loss_only, 50)
                print(f"{arch:9} {c:4d} {d:4d} {metric:>10} {1e3 * loss_s:8.3f} {1e3 * step_s:8.1f} "
                      f"{loss_s / step_s:7.2%}")


if __name__ == "__main__":
    main()
