"""``ncm report``: the final test error (or another metric) per group of runs, beside the
paper's numbers, as a table, Markdown, CSV or JSON."""

from __future__ import annotations

from pathlib import Path

from ncmcli.reports import tables
from ncmcli.reports.collect import collect

FORMATS = tables.FORMATS


def report_command(
    paths: list[Path], *, fmt: str, by: list[str] = (), metric: str = "test_error_pct", per_run: bool = False
) -> str:
    """The report as text; ``per_run`` (CSV only): one row per run with every key that varies."""
    if per_run:
        return tables.per_run_csv(paths)
    return tables.render(collect(paths, by=list(by), metric=metric), fmt, metric)
