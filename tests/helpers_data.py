"""Tiny datasets in the real on-disk formats, for offline loader tests. The IDX and folder
writers live in the package (``ncmcli.data.fakedata``, shared with the benchmarks); the CIFAR
writer stays here, because that format is a pickle and ncm's own modules never touch pickle."""

import pickle
from pathlib import Path

import numpy as np

from ncmcli.data.fakedata import make_folder, make_mnist, write_idx  # noqa: F401 (re-exported for the tests)


def make_cifar(root: Path, kind: str = "cifar10", per_batch: int = 4, seed=0):
    """CIFAR's python-pickle format as the official archives hold it (tests only write it)."""
    rng = np.random.default_rng(seed)
    classes = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    names = (
        ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
        if kind == "cifar10"
        else (["train"], ["test"])
    )
    out = {"train": [], "test": []}
    for split, files in zip(("train", "test"), names):
        for f in files:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = list(rng.integers(0, classes, per_batch))
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": data, label_key: [int(v) for v in labels]}, fh)
            out[split].append((data, labels))
    meta_name, meta_key = (
        ("batches.meta", "label_names") if kind == "cifar10" else ("meta", "fine_label_names")
    )
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, fh)
    return out
