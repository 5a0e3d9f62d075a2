"""``ncm anchors``, ``ncm presets``, ``ncm export`` and ``ncm report``: their options, and one
call into the engine each."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from ncmcli.cli.console import err, out_json, render_certificate, safe_text, show


def anchors(
    classes: int = typer.Option(..., "--classes", "-C", help="Number of classes C (>= 2)."),
    dim: int = typer.Option(..., "--dim", "-d", help="Feature dimension d (>= 1)."),
    method: str = typer.Option(
        "auto",
        "--method",
        "-m",
        help="auto, orthogonal, polar, simplex, orthoplex, optimized, random, or a .safetensors/.csv file.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for random and optimized."),
    metric: str = typer.Option(
        "euclidean", "--metric", help="Distance for the loss floor: euclidean, cosine, sqeuclidean."
    ),
    scale: str = typer.Option(
        "1",
        "--scale",
        help="Loss scale s for the loss floor: a number, or auto (the s whose floor is --floor-target).",
    ),
    floor_target: float = typer.Option(
        0.1, "--floor-target", help="With --scale auto: the loss floor, in nats, to solve for."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the anchors to this .safetensors file (key 'anchors')."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the certificate as one JSON document.", metavar=""
    ),
) -> None:
    """Build fixed class anchors and print their certificate (angles, loss floor)."""
    from ncmcli import engine

    cert = engine.anchors_command(
        classes, dim, method, seed=seed, metric=metric, scale=scale, floor_target=floor_target, out=out
    )
    if out is not None:
        err.print(f"wrote {show(str(out))}")
    if as_json:
        out_json(cert)
    else:
        render_certificate(cert, Console())


def presets() -> None:
    """List the presets, each with its one-line description."""
    from ncmcli.config.presets import list_presets

    items = list_presets()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        sys.stdout.write(f"{name:<{width}}  {desc}\n")


def export(
    target: Path = typer.Argument(..., help="A checkpoint, or a run folder (its best.safetensors)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output file (default: beside the checkpoint)."
    ),
    which: str = typer.Option(
        "best",
        "--which",
        help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors).",
    ),
) -> None:
    """A self-contained model: raw uint8 images in; logits, prediction (and anchor distances) out."""
    from ncmcli import engine

    path, shape = engine.export_command(target, fmt=fmt, out=out, which=which)
    err.print(
        f"wrote {show(str(path))} (input: {shape}; normalisation built in"
        + ("; class names and preprocessing in its metadata_props" if fmt == "onnx" else "")
        + ")"
    )
    sys.stdout.write(f"{safe_text(str(path))}\n")


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
    from ncmcli import tables
    from ncmcli.report import collect

    if fmt not in tables.FORMATS:
        raise typer.BadParameter(f"choose one of: {', '.join(tables.FORMATS)}", param_hint="--format")
    if per_run:
        if fmt != "csv":
            raise typer.BadParameter("--per-run goes with --format csv", param_hint="--per-run")
        sys.stdout.write(tables.per_run_csv(paths) + "\n")
        return
    text = tables.render(collect(paths, by=list(by), metric=metric), fmt, metric)
    if fmt in ("table", "md"):  # human-readable: no control characters from folder names
        text = "\n".join(safe_text(line) for line in text.split("\n"))
    sys.stdout.write(text + "\n")
