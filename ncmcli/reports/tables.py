"""``ncm report``'s output: the collected cells as the paper's tables (Table 2's methods by data set,
Table 3's dropout sweep, Figure 2's own row), a per-run CSV, and the four formats (table, md,
csv, json)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ncmcli.errors import UsageError
from ncmcli.reports import paper as papers
from ncmcli.reports.collect import METRICS, Cell, is_figure2, load_runs, varying_keys
from ncmcli.reports.paper import PAPER_ARCH

FORMATS = ("table", "md", "csv", "json")


def per_run_csv(paths: list[Path]) -> str:
    """One row per run: its folder, seed, final test error and every key that varies."""
    runs = load_runs(paths)
    vary = varying_keys(runs) if len(runs) > 1 else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "dataset", "net", "method", "dropout", "seed", "test_error_pct", *vary])
    for r in runs:
        dataset, method, dropout, net = r.labels
        w.writerow(
            [
                r.path,
                dataset,
                net,
                method,
                dropout,
                r.flat["seed"],
                f"{r.error:.4f}",
                *(_show(r.flat.get(k)) for k in vary),
            ]
        )
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
    count = (
        f"n={cell.n}"
        if distinct == cell.n
        else f"n={cell.n} runs, {distinct} seed{'s' if distinct > 1 else ''}"
    )
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
        out.append(
            (
                "Figure 2 (MNIST, 2-D features): test error % (mean ± std over seeds)",
                ["method", "p", "ours", "paper", "Δ"],
                rows,
            )
        )
    main = [c for c in cells if not is_figure2(c)]
    if main:
        cols = sorted({_col(c) for c in main}, key=lambda k: (k.split(" [")[0] not in PAPER_ARCH, k))
        index = {(c.method, c.dropout, _col(c)): c for c in main}
        row_keys = list(dict.fromkeys((c.method, c.dropout) for c in main))
        with_paper = [col for col in cols if any(c.paper is not None for c in main if _col(c) == col)]
        header = ["method", "p"] + [
            h for col in cols for h in ((f"{col} ours", "paper", "Δ") if col in with_paper else (col,))
        ]
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
    rows = [
        [
            c.dataset,
            c.net,
            c.method,
            f"{c.dropout:g}",
            *(_show(c.settings.get(k, "")) for k in keys),
            *_fmt(c),
        ]
        for c in cells
    ]
    return f"{what} per setting (mean ± std over seeds; a column per key that varies)", header, rows


def render(cells: list[Cell], fmt: str, metric: str = "test_error_pct") -> str:
    """The cells as a table, Markdown, CSV or JSON, with notes on marks and pooled keys."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(
            {
                "cells": [c.to_dict() for c in cells],
                "paper_source": json.loads(papers.PAPER_FILE.read_text())["source"],
            },
            indent=2,
        )
    if fmt == "csv":
        return _csv(cells)
    parts = []
    for title, header, rows in tables(cells, metric):
        if fmt == "md":
            parts.append(
                f"**{title}**\n\n| "
                + " | ".join(header)
                + " |\n|"
                + "---|" * len(header)
                + "\n"
                + "\n".join("| " + " | ".join(r) + " |" for r in rows)
            )
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *rows)]
            parts.append("\n".join([title, *(_padded(r, widths) for r in (header, *rows))]))
    parts += _notes(cells)
    return "\n\n".join(parts)


def _padded(row, widths) -> str:
    return "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()


def _csv(cells: list[Cell]) -> str:
    """One CSV row per cell, with a column per setting."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = list(dict.fromkeys(k for c in cells for k in c.settings))
    w.writerow(
        [
            "dataset",
            "net",
            "method",
            "dropout",
            *keys,
            "n",
            "mean_error_pct",
            "std",
            "paper_error_pct",
            "diff",
            "marks",
        ]
    )
    for c in cells:
        d = c.to_dict()
        w.writerow(
            [
                c.dataset,
                c.net,
                c.method,
                c.dropout,
                *(_show(c.settings.get(k, "")) for k in keys),
                c.n,
                f"{c.mean:.4f}",
                "" if d["std"] is None else f"{d['std']:.4f}",
                "" if c.paper is None else c.paper,
                "" if d["diff"] is None else f"{d['diff']:.4f}",
                ";".join(d["marks"]),
            ]
        )
    return buf.getvalue().rstrip("\n")


def _notes(cells: list[Cell]) -> list[str]:
    """What the table's marks, pooled keys, repeated seeds and paper column mean."""
    parts = []
    marks = set().union(*(c.marks for c in cells))
    notes = {
        "epochs": "epochs = not the paper's budget (90 epochs; Liu et al.'s 30k iterations for Hinge/L-Softmax)",
        "net": "net = not the paper's net for that data set (the paper column is its net's number)",
        "subset": "subset = trained or tested on part of the data",
    }
    if marks:
        parts.append("* marks: " + "; ".join(notes[m] for m in sorted(marks)))
    pooled = list(dict.fromkeys(k for c in cells for k in c.pooled))
    if pooled:
        parts.append(
            "pooled over: " + ", ".join(pooled) + " (runs that differ in these are averaged together "
            "by --by; drop --by to keep them apart)"
        )
    if any(len(set(map(repr, c.seeds))) < c.n for c in cells):
        parts.append("Some cells repeat a seed: their ± is over runs, not independent seeds.")
    if any(c.paper is not None for c in cells):
        parts.append("Paper column: " + json.loads(papers.PAPER_FILE.read_text())["source"])
    return parts
