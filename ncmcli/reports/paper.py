"""The paper's published numbers (Tables 2 and 3, in paper_results.json) and the labels that
name a run the way its tables do: data set (MNIST, CIFAR-10, CIFAR-10+, CIFAR-100) and method."""

from __future__ import annotations

import json
from pathlib import Path

from ncmcli import registry

PAPER_FILE = Path(__file__).resolve().parent / "paper_results.json"


PAPER_DATASETS = {
    ("mnist", False): "MNIST",
    ("cifar10", False): "CIFAR-10",
    ("cifar10", True): "CIFAR-10+",
    ("cifar100", False): "CIFAR-100",
}


PAPER_ARCH = {"MNIST": "mnist", "CIFAR-10": "cifar10", "CIFAR-10+": "cifar10", "CIFAR-100": "cifar100"}


FIGURE2_ARCH = "mnist2d"  # Figure 2's 2-D net: its own row, never the MNIST Table 2 cell


PAPER_EPOCHS = 90


# Hinge and L-Softmax follow Liu et al.'s released recipe: 30,000 iterations of 128.
LIU_METHODS = ("Hinge", "L-Softmax")


LIU_EPOCHS = {"MNIST": 64, "CIFAR-10": 77, "CIFAR-10+": 77, "CIFAR-100": 77}


METHOD_ORDER = [
    "SoftMax",
    "Hinge",
    "Hinge (WW)",
    "L-Softmax m=1",
    "L-Softmax m=2",
    "L-Softmax m=3",
    "L-Softmax m=4",
    "Center",
    "C-NCM",
    "E-NCM",
    "sq-NCM",
]


def method_label(loss) -> str:
    return registry.loss_label(loss)


def dataset_label(data) -> str:
    if (data.name, data.augment) in PAPER_DATASETS:
        return PAPER_DATASETS[(data.name, data.augment)]
    if data.name == "folder" and data.root:
        # Your own folder is not the paper's data set, even when it holds CIFAR-10 images.
        return f"folder {Path(data.root).name}" + _plus(data.augment)
    return registry.DATASETS[data.name].label + _plus(data.augment)


def _plus(augment) -> str:
    return "+rrc" if augment == "randomresizedcrop" else "+" if augment else ""


def load_paper() -> dict:
    """(dataset, net, method, dropout) -> paper error %, from the shipped JSON."""
    doc = json.loads(PAPER_FILE.read_text())
    out: dict = {}
    for c in doc["cells"]:
        if c.get("error_pct") is None:
            continue
        net = c.get("net") or PAPER_ARCH.get(c["dataset"], "")
        out[(c["dataset"], net, c["method"], float(c["dropout"]))] = float(c["error_pct"])
    return out


def paper_value(
    paper: dict, dataset: str, net: str, method: str, dropout: float
) -> tuple[float | None, bool]:
    """The paper's number for a cell, and whether it belongs to another net. A run on a net
    the paper did not use (a CPU-sized one) is shown beside the paper's-net number, marked;
    Figure 2's 2-D net only ever matches the Figure 2 cells."""
    exact = paper.get((dataset, net, method, dropout))
    if exact is not None or net == FIGURE2_ARCH or dataset not in PAPER_ARCH:
        return exact, False
    other = paper.get((dataset, PAPER_ARCH[dataset], method, dropout))
    return other, other is not None
