"""`ncm report`: aggregate run folders into tables shaped like the paper's Tables 2 and 3.

This module is long because it holds the whole command: reading runs, grouping them by
config, the paper's numbers, and the four output formats (table, md, csv, json)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ncmcli import registry
from ncmcli.config.overrides import dotted, from_dict
from ncmcli.runs.rundir import RunDir
from ncmcli.config.presets import load_yaml_text
from ncmcli.errors import NcmError, UsageError

PAPER_FILE = Path(__file__).resolve().parent / "paper_results.json"
PAPER_DATASETS = {("mnist", False): "MNIST", ("cifar10", False): "CIFAR-10", ("cifar10", True): "CIFAR-10+",
                  ("cifar100", False): "CIFAR-100"}
PAPER_ARCH = {"MNIST": "mnist", "CIFAR-10": "cifar10", "CIFAR-10+": "cifar10", "CIFAR-100": "cifar100"}
FIGURE2_ARCH = "mnist2d"  # Figure 2's 2-D net: its own row, never the MNIST Table 2 cell
PAPER_EPOCHS = 90
# Hinge and L-Softmax follow Liu et al.'s released recipe: 30,000 iterations of 128.
LIU_METHODS = ("Hinge", "L-Softmax")
LIU_EPOCHS = {"MNIST": 64, "CIFAR-10": 77, "CIFAR-10+": 77, "CIFAR-100": 77}
METHOD_ORDER = ["SoftMax", "Hinge", "Hinge (WW)", "L-Softmax m=1", "L-Softmax m=2", "L-Softmax m=3",
                "L-Softmax m=4", "Center", "C-NCM", "E-NCM", "sq-NCM"]
FORMATS = ("table", "md", "csv", "json")
# Never part of a group's identity: the seed is what a group averages over; the rest name
# where things are, not what was trained.
IGNORED_KEYS = ("seed", "description", "data.root")
# Shown by a cell's labels (data set, net, method, p) rather than as columns.
LABEL_KEYS = ("data.name", "data.augment", "model.arch", "loss.name", "loss.margin", "loss.hinge_form",
              "model.dropout")


@dataclass
class Cell:
    dataset: str
    method: str
    dropout: float
    net: str = ""
    errors: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    marks: set = field(default_factory=set)
    paper: float | None = None
    settings: dict = field(default_factory=dict)  # keys that vary across the runs, beyond the labels
    seeds: list = field(default_factory=list)  # one per run: a repeated seed is not a new sample
    pooled: list = field(default_factory=list)  # --by: keys whose values differ inside the cell

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


def find_runs(paths: list[Path]) -> list[Path]:
    from ncmcli.runs.rundir import find_runs as runs_under
    from ncmcli.runs.runfiles import RESULT

    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"no such run folder: {p}")
    runs = runs_under(paths)
    if not runs:
        raise UsageError(f"no {RESULT} under {', '.join(map(str, paths))}")
    return sorted(set(runs))


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


def paper_value(paper: dict, dataset: str, net: str, method: str, dropout: float) -> tuple[float | None, bool]:
    """The paper's number for a cell, and whether it belongs to another net. A run on a net
    the paper did not use (a CPU-sized one) is shown beside the paper's-net number, marked;
    Figure 2's 2-D net only ever matches the Figure 2 cells."""
    exact = paper.get((dataset, net, method, dropout))
    if exact is not None or net == FIGURE2_ARCH or dataset not in PAPER_ARCH:
        return exact, False
    other = paper.get((dataset, PAPER_ARCH[dataset], method, dropout))
    return other, other is not None


def is_figure2(cell: Cell) -> bool:
    return cell.dataset == "MNIST" and cell.net == FIGURE2_ARCH


@dataclass
class Run:
    path: str
    error: float
    flat: dict  # dotted key -> value of the resolved config
    labels: tuple  # (dataset, method, dropout, net)
    cfg: object


def _flat(tree: dict) -> dict:
    """Dotted keys; lists as tuples, so that values compare and print as settings."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dotted(tree).items()}


# Besides the test error, a report can aggregate any number a run's result.json records for its
# final epoch (``--metric``): accuracies are shown in %, like the error.
METRICS = {"test_error_pct": "Test error %", "test_acc": "Test accuracy %", "train_acc": "Training accuracy %",
           "test_balanced_acc": "Balanced test accuracy %", "test_head_acc": "Head-third test accuracy %",
           "test_medium_acc": "Medium-third test accuracy %", "test_tail_acc": "Tail-third test accuracy %",
           "scale": "Final NCM scale s"}


def metric_value(result: dict, metric: str) -> float:
    """``metric`` of one result.json, in the unit the report shows (accuracies in %)."""
    value = result["test_error_pct"] if metric == "test_error_pct" else result.get("final", {}).get(metric)
    if value is None:
        raise KeyError(metric)
    return 100.0 * float(value) if metric.endswith("_acc") else float(value)


def _lacks(result: dict, metric: str) -> bool:
    return metric != "test_error_pct" and result.get("final", {}).get(metric) is None


def load_runs(paths: list[Path], metric: str = "test_error_pct") -> list[Run]:
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}" + registry.suggest(metric, METRICS))
    runs = []
    for run in find_runs(paths):
        try:
            folder = RunDir(run)
            result = folder.result()
            cfg = from_dict(load_yaml_text(folder.config_text(), str(folder.config)))
            error = None if _lacks(result, metric) else metric_value(result, metric)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError, NcmError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NcmError(f"{run}: unreadable run ({reason[:120]})") from None
        if error is None:
            raise UsageError(f"{run}: result.json records no {metric} (long-tailed runs record head/medium/tail, "
                             "NCM runs their scale)")
        labels = (dataset_label(cfg.data), method_label(cfg.loss), cfg.model.dropout, cfg.model.arch)
        # Keys the run's loss never reads (lambda_gamma on SoftMax) neither split nor label it.
        flat = registry.keys_read(_flat(cfg.to_dict()))
        flat.update({k: v for k, v in (result.get("resolved") or {}).items() if k in flat})  # 28, not 0
        runs.append(Run(str(run), error, flat, labels, cfg))
    return runs


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys (not the seed or paths) whose values differ across the ``runs`` that read them."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.flat) if k not in IGNORED_KEYS]
    return [k for k in keys if len({repr(r.flat[k]) for r in runs if k in r.flat}) > 1]


def collect(paths: list[Path], by: list[str] = (), metric: str = "test_error_pct") -> list[Cell]:
    """Cells of runs that differ in nothing but the seed (and paths), or, with ``by``, in
    nothing but what ``by`` leaves out. A key that varies between runs of the same data set,
    net, method and p becomes a setting of the cell (a column), so such runs are never
    averaged together."""
    from ncmcli.config.schema import SCHEMA

    runs = load_runs(paths, metric)
    for key in by:
        if key not in SCHEMA:
            raise UsageError(f"--by {key}: not a config key (see the README's config table)")
    vary = varying_keys(runs)
    if by:
        group_keys = list(by)
    else:
        # Keys that split some (data set, net, method, p) group: these become columns.
        group_keys = [k for k in vary if k not in LABEL_KEYS and any(
            len({repr(r.flat.get(k)) for r in runs if r.labels == lab}) > 1 for lab in {r.labels for r in runs})]
        if group_keys:  # a per-setting table: every key that differs between its rows gets a column
            group_keys = [k for k in vary if k not in LABEL_KEYS]
    paper = load_paper()
    cells: dict[tuple, Cell] = {}
    for r in runs:
        settings = {k: r.flat[k] for k in group_keys if k not in LABEL_KEYS and k in r.flat}
        key = (r.labels, tuple(settings.items())) if not by else tuple(repr(r.flat.get(k)) for k in by)
        if key not in cells:
            dataset, method, dropout, net = r.labels
            value, other_net = paper_value(paper, dataset, net, method, dropout)
            if metric != "test_error_pct":  # the paper reports errors only
                value, other_net = None, False
            cells[key] = Cell(dataset, method, dropout, net=net, paper=value,
                              settings={k: r.flat.get(k) for k in by} if by else settings)
            if other_net:
                cells[key].marks.add("net")
        cell = cells[key]
        if by and (cell.dataset, cell.method, cell.dropout, cell.net) != r.labels:
            cell.paper = None  # a --by group that mixes cells has no one paper number
        cell.errors.append(r.error)
        cell.runs.append(r.path)
        cell.seeds.append(r.flat.get("seed"))
        _mark(cell, r.cfg)
    if by:  # what a --by grouping averages over besides the seed: say so
        members = {}
        for r in runs:
            members.setdefault(tuple(repr(r.flat.get(k)) for k in by), []).append(r)
        for key, cell in cells.items():
            group = members.get(key, [])
            cell.pooled = [k for k in varying_keys(group) if k not in by and k not in IGNORED_KEYS]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(cells.values(), key=lambda c: (order.get(c.method, 99), c.dataset, c.net, c.dropout,
                                                 repr(sorted(c.settings.items()))))


def _mark(cell: Cell, cfg) -> None:
    if cell.dataset in PAPER_ARCH and not is_figure2(cell):
        liu = cell.method.startswith(LIU_METHODS)
        if cfg.train.epochs != (LIU_EPOCHS[cell.dataset] if liu else PAPER_EPOCHS):
            cell.marks.add("epochs")
        if cfg.model.arch != PAPER_ARCH[cell.dataset]:
            cell.marks.add("net")
    if cfg.data.limit_train or cfg.data.limit_test:
        cell.marks.add("subset")


def per_run_csv(paths: list[Path]) -> str:
    """One row per run: its folder, seed, final test error and every key that varies."""
    runs = load_runs(paths)
    vary = varying_keys(runs) if len(runs) > 1 else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "dataset", "net", "method", "dropout", "seed", "test_error_pct", *vary])
    for r in runs:
        dataset, method, dropout, net = r.labels
        w.writerow([r.path, dataset, net, method, dropout, r.flat["seed"], f"{r.error:.4f}",
                    *(_show(r.flat.get(k)) for k in vary)])
    return buf.getvalue().rstrip("\n")


def _show(value) -> str:
    if value is None:
        return ""  # a key this run's loss does not read
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _fmt(cell: Cell | None) -> tuple[str, str, str]:
    if cell is None:
        return "", "", ""
    distinct = len(set(map(repr, cell.seeds))) if cell.seeds else cell.n
    count = f"n={cell.n}" if distinct == cell.n else f"n={cell.n} runs, {distinct} seed{'s' if distinct > 1 else ''}"
    ours = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "") + f" ({count})"
    if cell.marks:
        ours += " *" + ",".join(sorted(cell.marks))
    paper = "n/a" if cell.paper is None else f"{cell.paper:.2f}"
    diff = "" if cell.paper is None else f"{cell.mean - cell.paper:+.2f}"
    return ours, paper, diff


def _col(c: Cell) -> str:
    """A data-set column label; the net is named when it is not the paper's for that data set."""
    return c.dataset if PAPER_ARCH.get(c.dataset) == c.net else f"{c.dataset} [{c.net}]"


def tables(cells: list[Cell], metric: str = "test_error_pct") -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) views of the cells: Figure 2 (the 2-D MNIST net), error by
    method and data set (the shape of Table 2), and, where runs vary the dropout of the
    SoftMax/C-NCM/E-NCM cells, error by dropout p (the shape of Table 3)."""
    if any(c.settings for c in cells):
        return [_settings_table(cells, METRICS[metric])]
    out = []
    fig2 = [c for c in cells if is_figure2(c)]
    if fig2:
        rows = [[c.method, f"{c.dropout:g}", *_fmt(c)] for c in fig2]
        out.append(("Figure 2 (MNIST, 2-D features): test error % (mean ± std over seeds)",
                    ["method", "p", "ours", "paper", "Δ"], rows))
    main = [c for c in cells if not is_figure2(c)]
    if main:
        cols = sorted({_col(c) for c in main}, key=lambda k: (k.split(" [")[0] not in PAPER_ARCH, k))
        index = {(c.method, c.dropout, _col(c)): c for c in main}
        row_keys = list(dict.fromkeys((c.method, c.dropout) for c in main))
        with_paper = [col for col in cols if any(c.paper is not None for c in main if _col(c) == col)]
        header = ["method", "p"] + [h for col in cols for h in ((f"{col} ours", "paper", "Δ") if col in with_paper else (col,))]
        rows = []
        for m, p in row_keys:
            row = [m, f"{p:g}"]
            for col in cols:
                vals = _fmt(index.get((m, p, col)))
                row += vals if col in with_paper else vals[:1]
            rows.append(row)
        title = f"{METRICS[metric]} by method and data set (mean ± std over seeds)"
        if any(c.dataset in PAPER_ARCH for c in main):
            title += "; paper column: Table 2, or Table 3 for SoftMax and other p"
        out.append((title, header, rows))
    t3 = [c for c in main if c.method in ("SoftMax", "C-NCM", "E-NCM")]
    ps = sorted({c.dropout for c in t3})
    if t3 and len(ps) > 1:
        index = {(_col(c), c.method, c.dropout): c for c in t3}
        with_paper = any(c.paper is not None for c in t3)
        width = 3 if with_paper else 1  # no paper/Δ columns for data sets the paper did not use
        header = ["data set", "method"] + [h for p in ps for h in (f"p={p:g} ours", "paper", "Δ")[:width]]
        rows = []
        for d in sorted({_col(c) for c in t3}):
            for m in ("SoftMax", "C-NCM", "E-NCM"):
                if any(_col(c) == d and c.method == m for c in t3):
                    rows.append([d, m] + [v for p in ps for v in _fmt(index.get((d, m, p)))[:width]])
        out.append((f"{METRICS[metric]} by dropout p (the shape of Table 3)", header, rows))
    return out


def _settings_table(cells: list[Cell], what: str = "Test error %") -> tuple[str, list[str], list[list[str]]]:
    """One row per cell, with a column per key that varies: for runs whose settings differ
    beyond data set, net, method and p (or a --by grouping)."""
    keys = list(dict.fromkeys(k for c in cells for k in c.settings))
    header = ["data set", "net", "method", "p", *keys, "ours", "paper", "Δ"]
    rows = [[c.dataset, c.net, c.method, f"{c.dropout:g}", *(_show(c.settings.get(k, "")) for k in keys), *_fmt(c)]
            for c in cells]
    return f"{what} per setting (mean ± std over seeds; a column per key that varies)", header, rows


def render(cells: list[Cell], fmt: str, metric: str = "test_error_pct") -> str:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"cells": [c.to_dict() for c in cells], "paper_source": json.loads(PAPER_FILE.read_text())["source"]}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        keys = list(dict.fromkeys(k for c in cells for k in c.settings))
        w.writerow(["dataset", "net", "method", "dropout", *keys, "n", "mean_error_pct", "std", "paper_error_pct", "diff", "marks"])
        for c in cells:
            d = c.to_dict()
            w.writerow([c.dataset, c.net, c.method, c.dropout, *(_show(c.settings.get(k, "")) for k in keys), c.n, f"{c.mean:.4f}",
                        "" if d["std"] is None else f"{d['std']:.4f}",
                        "" if c.paper is None else c.paper, "" if d["diff"] is None else f"{d['diff']:.4f}",
                        ";".join(d["marks"])])
        return buf.getvalue().rstrip("\n")
    parts = []
    for title, header, rows in tables(cells, metric):
        if fmt == "md":
            parts.append(f"**{title}**\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                         + "\n".join("| " + " | ".join(r) + " |" for r in rows))
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
            parts.append("\n".join([title, line(header), *map(line, rows)]))
    marks = set().union(*(c.marks for c in cells))
    notes = {"epochs": "epochs = not the paper's budget (90 epochs; Liu et al.'s 30k iterations for Hinge/L-Softmax)",
             "net": "net = not the paper's net for that data set (the paper column is its net's number)",
             "subset": "subset = trained or tested on part of the data"}
    if marks:
        parts.append("* marks: " + "; ".join(notes[m] for m in sorted(marks)))
    pooled = list(dict.fromkeys(k for c in cells for k in c.pooled))
    if pooled:
        parts.append("pooled over: " + ", ".join(pooled) + " (runs that differ in these are averaged together "
                     "by --by; drop --by to keep them apart)")
    if any(len(set(map(repr, c.seeds))) < c.n for c in cells):
        parts.append("Some cells repeat a seed: their ± is over runs, not independent seeds.")
    if any(c.paper is not None for c in cells):
        parts.append("Paper column: " + json.loads(PAPER_FILE.read_text())["source"])
    return "\n\n".join(parts)
