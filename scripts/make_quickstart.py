"""Build ncmcli/quickstart/fashion-mnist-quickstart.safetensors.gz from real Fashion-MNIST.

Takes the first 500 training and the first 100 test images of each class (class-balanced,
deterministic) from the IDX files of Debian's `dataset-fashion-mnist` package (or any folder
given as the first argument), and stores them as uint8 tensors in a gzipped safetensors file.

Fashion-MNIST is (c) Zalando SE, MIT licence: https://github.com/zalandoresearch/fashion-mnist

    python scripts/make_quickstart.py [/usr/share/datasets/fashion-mnist]
"""

import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ncmcli.data.sources import DATA_LICENSE_NOTE, QUICKSTART_FILE, read_idx

PER_CLASS = {"train": 500, "test": 100}
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
    tensors = {}
    for split, (img_name, lbl_name) in FILES.items():
        images, labels = read_idx(src / img_name), read_idx(src / lbl_name)
        keep = np.concatenate([np.flatnonzero(labels == c)[: PER_CLASS[split]] for c in range(10)])
        keep.sort()  # keep the original order, classes interleaved
        tensors[f"{split}_images"] = torch.from_numpy(images[keep].copy()).unsqueeze(1)
        tensors[f"{split}_labels"] = torch.from_numpy(labels[keep].astype(np.uint8))
    blob = save(tensors, metadata={"source": "Fashion-MNIST (Zalando SE, MIT)", "note": DATA_LICENSE_NOTE})
    QUICKSTART_FILE.parent.mkdir(parents=True, exist_ok=True)
    QUICKSTART_FILE.write_bytes(gzip.compress(blob, compresslevel=9, mtime=0))
    print(f"wrote {QUICKSTART_FILE} ({QUICKSTART_FILE.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
