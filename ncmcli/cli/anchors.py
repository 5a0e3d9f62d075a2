"""``ncm anchors``: its options, and one call to ``commands.anchors``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ncmcli.cli.console import err, out_json, render_certificate, show


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
    from ncmcli.commands.anchors import anchors_command

    cert = anchors_command(
        classes, dim, method, seed=seed, metric=metric, scale=scale, floor_target=floor_target, out=out
    )
    if out is not None:
        err.print(f"wrote {show(str(out))}")
    if as_json:
        out_json(cert)
    else:
        render_certificate(cert, Console())
