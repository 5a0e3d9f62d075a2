"""``ncm export``: its options, and one call to ``commands.export``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ncmcli.cli.console import err, safe_text, show


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
    from ncmcli.commands.export import export_command

    path, shape = export_command(target, fmt=fmt, out=out, which=which)
    err.print(
        f"wrote {show(str(path))} (input: {shape}; normalisation built in"
        + ("; class names and preprocessing in its metadata_props" if fmt == "onnx" else "")
        + ")"
    )
    sys.stdout.write(f"{safe_text(str(path))}\n")
