"""Benchmark 1: `ncm train` end-to-end images/s divided by a model-only loop (forward,
backward, step on one fixed in-memory batch) for the same net, batch and threads.

    python benchmarks/pipeline_efficiency.py

The end-to-end figure is the second epoch's images/s from metrics.jsonl (the first carries
one-time warm-up), over data in real on-disk formats: a CIFAR-shaped image folder (augmented,
as CIFAR-10+), MNIST IDX files, and the embedded quickstart data.
"""

import json
import tempfile
from pathlib import Path

import torch
from _common import model_only_rate, parse

from ncmcli.config.presets import resolve
from ncmcli.data.fakedata import make_folder, make_mnist
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter

CASES = [
    # name, preset, overrides, input shape, classes, images per epoch
    ("CIFAR-10+ shaped, cifar10 net", "cifar10plus-encm", ["train.batch_size=128"], (3, 32, 32), 10, 1024),
    ("MNIST shaped, mnist net", "mnist-encm", ["train.batch_size=128"], (1, 28, 28), 10, 2048),
    ("quickstart, tiny net", "quickstart", [], (1, 28, 28), 10, 5000),
]


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    threads = torch.get_num_threads()
    print(f"threads: {threads}")
    print(f"{'case':34} {'ncm train img/s':>16} {'model-only img/s':>17} {'ratio':>7}")
    for name, preset, over, shape, classes, n in CASES:
        if args.dry_run:
            n, over = 64, over + ["model.arch=tiny"]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = []
            if preset.startswith("cifar"):
                make_folder(
                    tmp / "cifar", classes=[f"c{i}" for i in range(10)], per_class=n // 10, size=(32, 32)
                )
                data = [
                    "data.name=folder",
                    f"data.root={tmp / 'cifar'}",
                    "data.image_size=32",
                    "data.cache=false",
                ]
            elif preset.startswith("mnist"):
                make_mnist(tmp, n_train=n, n_test=256)
                data = [f"data.root={tmp}", "data.download=false"]
            cfg = resolve(
                preset,
                over
                + data
                + ["train.epochs=2", f"data.limit_train={n}", "data.limit_test=64", "optim.schedule=none"],
            )
            run = tmp / "run"
            run.mkdir()
            train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter())
            e2e = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["images_per_s"]
        batch = cfg.train.batch_size
        ceiling = model_only_rate(
            preset, over, shape, classes, batch, steps=max(1 if args.dry_run else 3, n // batch)
        )
        print(f"{name:34} {e2e:16.1f} {ceiling:17.1f} {e2e / ceiling:7.3f}")


if __name__ == "__main__":
    main()
