"""`ncm report`: aggregate run folders into tables shaped like the paper's Tables 2 and 3.

Reading runs, grouping them by config, and the four output formats (table, md, csv, json);
the paper's numbers and labels are in ``paper``."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ncmcli import registry
from ncmcli.config.overrides import dotted, from_dict
from ncmcli.config.presets import load_yaml_text
from ncmcli.config.schema import SCHEMA
from ncmcli.errors import NcmError, UsageError
from ncmcli.reports import paper as papers
from ncmcli.reports.paper import (
    FIGURE2_ARCH,
    LIU_EPOCHS,
    LIU_METHODS,
    METHOD_ORDER,
    PAPER_ARCH,
    PAPER_EPOCHS,
    dataset_label,
    method_label,
    paper_value,
)
from ncmcli.runs.rundir import RunDir
from ncmcli.runs.rundir import find_runs as runs_under
from ncmcli.runs.runfiles import RESULT

# Never part of a group's identity: the seed is what a group averages over; the rest name
# where things are, not what was trained.
IGNORED_KEYS = ("seed", "description", "data.root")
# Shown by a cell's labels (data set, net, method, p) rather than as columns.
LABEL_KEYS = (
    "data.name",
    "data.augment",
    "model.arch",
    "loss.name",
    "loss.margin",
    "loss.hinge_form",
    "model.dropout",
)


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
        d.update(
            n=self.n,
            mean=self.mean,
            std=self.std,
            marks=sorted(self.marks),
            diff=None if self.paper is None else self.mean - self.paper,
        )
        return d


def find_runs(paths: list[Path]) -> list[Path]:

    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"no such run folder: {p}")
    runs = runs_under(paths)
    if not runs:
        raise UsageError(f"no {RESULT} under {', '.join(map(str, paths))}")
    return sorted(set(runs))


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
METRICS = {
    "test_error_pct": "Test error %",
    "test_acc": "Test accuracy %",
    "train_acc": "Training accuracy %",
    "test_balanced_acc": "Balanced test accuracy %",
    "test_head_acc": "Head-third test accuracy %",
    "test_medium_acc": "Medium-third test accuracy %",
    "test_tail_acc": "Tail-third test accuracy %",
    "scale": "Final NCM scale s",
}


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
        raise UsageError(
            f"--metric must be one of {', '.join(METRICS)}, got {metric!r}"
            + registry.suggest(metric, METRICS)
        )
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
            raise UsageError(
                f"{run}: result.json records no {metric} (long-tailed runs record head/medium/tail, "
                "NCM runs their scale)"
            )
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

    runs = load_runs(paths, metric)
    for key in by:
        if key not in SCHEMA:
            raise UsageError(f"--by {key}: not a config key (see the README's config table)")
    group_keys = list(by) if by else _setting_keys(runs)
    paper = papers.load_paper()
    cells: dict[tuple, Cell] = {}
    for r in runs:
        settings = {k: r.flat[k] for k in group_keys if k not in LABEL_KEYS and k in r.flat}
        key = (r.labels, tuple(settings.items())) if not by else tuple(repr(r.flat.get(k)) for k in by)
        if key not in cells:
            dataset, method, dropout, net = r.labels
            value, other_net = paper_value(paper, dataset, net, method, dropout)
            if metric != "test_error_pct":  # the paper reports errors only
                value, other_net = None, False
            cells[key] = Cell(
                dataset,
                method,
                dropout,
                net=net,
                paper=value,
                settings={k: r.flat.get(k) for k in by} if by else settings,
            )
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
        _pooled(cells, runs, by)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(
        cells.values(),
        key=lambda c: (
            order.get(c.method, 99),
            c.dataset,
            c.net,
            c.dropout,
            repr(sorted(c.settings.items())),
        ),
    )


def _mark(cell: Cell, cfg) -> None:
    if cell.dataset in PAPER_ARCH and not is_figure2(cell):
        liu = cell.method.startswith(LIU_METHODS)
        if cfg.train.epochs != (LIU_EPOCHS[cell.dataset] if liu else PAPER_EPOCHS):
            cell.marks.add("epochs")
        if cfg.model.arch != PAPER_ARCH[cell.dataset]:
            cell.marks.add("net")
    if cfg.data.limit_train or cfg.data.limit_test:
        cell.marks.add("subset")


def _setting_keys(runs: list[Run]) -> list[str]:
    """The keys that split some (data set, net, method, p) group, which become columns; when
    there are any, every key that differs between rows gets a column (a per-setting table)."""
    vary = varying_keys(runs)
    splitting = [
        k
        for k in vary
        if k not in LABEL_KEYS
        and any(
            len({repr(r.flat.get(k)) for r in runs if r.labels == lab}) > 1
            for lab in {r.labels for r in runs}
        )
    ]
    return [k for k in vary if k not in LABEL_KEYS] if splitting else []


def _pooled(cells: dict, runs: list[Run], by: list[str]) -> None:
    """Each --by cell's ``pooled``: the keys it averages over besides the seed."""
    members = {}
    for r in runs:
        members.setdefault(tuple(repr(r.flat.get(k)) for k in by), []).append(r)
    for key, cell in cells.items():
        group = members.get(key, [])
        cell.pooled = [k for k in varying_keys(group) if k not in by and k not in IGNORED_KEYS]
