"""`ncm report`: aggregate run folders into tables shaped like the paper's Tables 2 and 3."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ncmcli.config import from_dict
from ncmcli.errors import NcmError, UsageError

PAPER_FILE = Path(__file__).resolve().parent / "paper_results.json"
PAPER_DATASETS = {("mnist", False): "MNIST", ("cifar10", False): "CIFAR-10", ("cifar10", True): "CIFAR-10+",
                  ("cifar100", False): "CIFAR-100"}
PAPER_ARCH = {"MNIST": "mnist", "CIFAR-10": "cifar10", "CIFAR-10+": "cifar10", "CIFAR-100": "cifar100"}
PAPER_EPOCHS = 90
METHOD_ORDER = ["SoftMax", "Hinge", "Hinge (WW)", "L-Softmax m=1", "L-Softmax m=2", "L-Softmax m=3",
                "L-Softmax m=4", "Center", "C-NCM", "E-NCM", "sq-NCM"]
FORMATS = ("table", "md", "csv", "json")


@dataclass
class Cell:
    dataset: str
    method: str
    dropout: float
    errors: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    marks: set = field(default_factory=set)
    paper: float | None = None

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.errors) if self.n > 1 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n=self.n, mean=self.mean, std=self.std, marks=sorted(self.marks),
                 diff=None if self.paper is None else self.mean - self.paper)
        return d


def method_label(loss) -> str:
    return {"softmax": "SoftMax", "encm": "E-NCM", "cncm": "C-NCM", "sqncm": "sq-NCM", "center": "Center",
            "hinge": "Hinge" if loss.hinge_form == "ova" else "Hinge (WW)",
            "lsoftmax": f"L-Softmax m={loss.margin}"}[loss.name]


def dataset_label(data) -> str:
    if (data.name, data.augment) in PAPER_DATASETS:
        return PAPER_DATASETS[(data.name, data.augment)]
    return {"fashion-mnist": "Fashion-MNIST", "quickstart": "quickstart", "folder": "folder"}.get(
        data.name, data.name) + ("+" if data.augment else "")


def find_runs(paths: list[Path]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"no such run folder: {p}")
        found = [p] if (p / "result.json").is_file() else sorted(q.parent for q in p.rglob("result.json"))
        runs += found
    if not runs:
        raise UsageError(f"no result.json under {', '.join(map(str, paths))}")
    return sorted(set(runs))


def load_paper() -> dict:
    doc = json.loads(PAPER_FILE.read_text())
    return {(c["dataset"], c["method"], float(c["dropout"])): c["error_pct"] for c in doc["cells"]}


def collect(paths: list[Path]) -> list[Cell]:
    paper = load_paper()
    cells: dict[tuple, Cell] = {}
    for run in find_runs(paths):
        try:
            result = json.loads((run / "result.json").read_text())
            cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        except (OSError, ValueError, yaml.YAMLError, NcmError) as exc:
            raise NcmError(f"{run}: unreadable run ({str(exc).splitlines()[0]})") from None
        key = (dataset_label(cfg.data), method_label(cfg.loss), cfg.model.dropout)
        cell = cells.setdefault(key, Cell(*key, paper=paper.get(key)))
        cell.errors.append(float(result["test_error_pct"]))
        cell.runs.append(str(run))
        if key[0] in PAPER_ARCH:
            if cfg.train.epochs != PAPER_EPOCHS:
                cell.marks.add("epochs")
            if cfg.model.arch != PAPER_ARCH[key[0]]:
                cell.marks.add("net")
        if cfg.data.limit_train or cfg.data.limit_test:
            cell.marks.add("subset")
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(cells.values(), key=lambda c: (order.get(c.method, 99), c.dataset, c.dropout))


def _fmt(cell: Cell | None) -> tuple[str, str, str]:
    if cell is None:
        return "", "", ""
    ours = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "") + f" (n={cell.n})"
    if cell.marks:
        ours += " *" + ",".join(sorted(cell.marks))
    paper = "n/a" if cell.paper is None else f"{cell.paper:.2f}"
    diff = "" if cell.paper is None else f"{cell.mean - cell.paper:+.2f}"
    return ours, paper, diff


def tables(cells: list[Cell]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for a Table-2 view (methods x datasets) and, where runs vary
    the dropout of CIFAR cells, a Table-3 view (dataset/method x p)."""
    out = []
    by_ds_p = sorted({(c.dataset, c.dropout) for c in cells}, key=lambda k: (k[0] not in PAPER_ARCH, k))
    methods = list(dict.fromkeys(c.method for c in cells))
    index = {(c.dataset, c.method, c.dropout): c for c in cells}
    t2_cols = [(d, p) for d, p in by_ds_p if d not in PAPER_ARCH or p == 0.1]
    if t2_cols:
        # Datasets the paper did not use get no paper/Δ columns.
        header = ["method"] + [h for d, p in t2_cols
                               for h in ((f"{d} (p={p:g}) ours", "paper", "Δ") if d in PAPER_ARCH else (f"{d} (p={p:g})",))]
        rows = [[m] + [v for d, p in t2_cols
                       for v in (_fmt(index.get((d, m, p))) if d in PAPER_ARCH else _fmt(index.get((d, m, p)))[:1])]
                for m in methods]
        rows = [r for r in rows if any(r[1:])]
        out.append(("Table 2: test error % (mean ± std over seeds)", header, rows))
    t3 = [c for c in cells if c.dataset.startswith("CIFAR") and c.method in ("SoftMax", "C-NCM", "E-NCM")]
    ps = sorted({c.dropout for c in t3})
    if t3 and ps != [0.1]:
        header = ["dataset", "method"] + [h for p in ps for h in (f"p={p:g} ours", "paper", "Δ")]
        rows = []
        for d in sorted({c.dataset for c in t3}):
            for m in ("SoftMax", "C-NCM", "E-NCM"):
                if any(c.dataset == d and c.method == m for c in t3):
                    rows.append([d, m] + [v for p in ps for v in _fmt(index.get((d, m, p)))])
        out.append(("Table 3: test error % by dropout p", header, rows))
    return out


def render(cells: list[Cell], fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"cells": [c.to_dict() for c in cells], "paper_source": json.loads(PAPER_FILE.read_text())["source"]}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["dataset", "method", "dropout", "n", "mean_error_pct", "std", "paper_error_pct", "diff", "marks"])
        for c in cells:
            d = c.to_dict()
            w.writerow([c.dataset, c.method, c.dropout, c.n, f"{c.mean:.4f}",
                        "" if d["std"] is None else f"{d['std']:.4f}",
                        "" if c.paper is None else c.paper, "" if d["diff"] is None else f"{d['diff']:.4f}",
                        ";".join(d["marks"])])
        return buf.getvalue().rstrip("\n")
    parts = []
    for title, header, rows in tables(cells):
        if fmt == "md":
            parts.append(f"**{title}**\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                         + "\n".join("| " + " | ".join(r) + " |" for r in rows))
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
            parts.append("\n".join([title, line(header), *map(line, rows)]))
    parts.append("* marks: epochs = not the paper's 90 epochs; net = not the paper's net for that dataset; "
                 "subset = trained or tested on part of the data. Paper column: " + json.loads(PAPER_FILE.read_text())["source"])
    return "\n\n".join(parts)
