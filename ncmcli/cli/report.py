"""``ncm report``: its options, and one call to ``commands.report``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ncmcli.cli.console import safe_text


def report(
    paths: list[Path] = typer.Argument(..., help="Run folders, or folders that contain them."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, md, csv or json."),
    by: list[str] = typer.Option(
        [], "--by", help="Group runs by this config key (repeatable) instead of by everything but the seed."
    ),
    per_run: bool = typer.Option(
        False, "--per-run", help="With --format csv: one row per run, with every key that varies.", metavar=""
    ),
    metric: str = typer.Option(
        "test_error_pct",
        "--metric",
        help="What to aggregate: test_error_pct, test_acc, train_acc, test_balanced_acc, test_head_acc, test_medium_acc, test_tail_acc or scale (final epoch).",
    ),
) -> None:
    """Final test error per group of runs (mean ± std over seeds), beside the paper's numbers.
    Runs that differ in anything but the seed (and paths) are never averaged together."""
    from ncmcli.commands.report import FORMATS, report_command

    if fmt not in FORMATS:
        raise typer.BadParameter(f"choose one of: {', '.join(FORMATS)}", param_hint="--format")
    if per_run and fmt != "csv":
        raise typer.BadParameter("--per-run goes with --format csv", param_hint="--per-run")
    text = report_command(paths, fmt=fmt, by=list(by), metric=metric, per_run=per_run)
    if fmt in ("table", "md"):  # human-readable: no control characters from folder names
        text = "\n".join(safe_text(line) for line in text.split("\n"))
    sys.stdout.write(text + "\n")
