"""``ncm predict``: its options, and one call to ``commands.predict``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from ncmcli.cli.console import err, out_json, safe_text, show


def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files or folders."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Default: $NCM_CHECKPOINT, else the newest runs/**/best.safetensors."
    ),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many classes to show per image."),
    reject_above: float | None = typer.Option(
        None,
        "--reject-above",
        help="Label an image 'unknown' when it is farther than this from every anchor.",
    ),
    reject_below_margin: float | None = typer.Option(
        None,
        "--reject-below-margin",
        help="Label an image 'unknown' when the second-nearest anchor is less than this farther than the nearest (the margin score; see ncm eval --ood).",
    ),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(
        256, "--batch-size", help="Images decoded and classified at a time (bounds memory)."
    ),
    resize: str | None = typer.Option(
        None,
        "--resize",
        help="crop (keep the aspect ratio: shorter side, centre crop) or squash; default: the checkpoint's data.resize.",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON document.", metavar=""),
    which: str = typer.Option(
        "best",
        "--which",
        help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors).",
    ),
) -> None:
    """Classify images with a checkpoint (preprocessing comes from the checkpoint)."""
    from ncmcli.commands.predict import predict_command
    from ncmcli.runs.runfiles import find_checkpoint

    path, why = find_checkpoint(checkpoint, dict(os.environ), Path.cwd(), which)
    if why != "--checkpoint":
        err.print(f"using {show(str(path))} ({show(why)})")
    res = predict_command(
        inputs,
        checkpoint_path=path,
        device=device,
        top_k=top_k,
        reject_above=reject_above,
        reject_below_margin=reject_below_margin,
        batch_size=batch_size,
        resize=resize,
    )
    err.print(f"model: {show(res['checkpoint'])}, epoch {res['epoch']}")
    resized = sum(bool(r.get("resized")) for r in res["predictions"])
    if resized:
        c, h, w = res["input_size"]
        how = "shorter side, centre crop" if res["resize"] == "crop" else "squashed"
        err.print(
            f"note: {resized} image(s) resized to {h}x{w} ({how}; {'grayscale' if c == 1 else 'RGB'}), "
            "as the model expects"
        )
    for r in res["predictions"]:
        if "error" in r:
            err.print(f"[red]error:[/red] {show(r['error'])}")
    if as_json:
        out_json(res)
    else:
        for r in res["predictions"]:
            if "error" in r:
                continue
            tops = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            if r["label"] == "unknown":
                tops = "unknown  (" + tops + ")"
            dist, margin = r["nearest_anchor_distance"], r.get("second_anchor_margin")
            sys.stdout.write(
                f"{safe_text(r['path'])}\t{safe_text(tops)}"
                + (f"\tdist {dist:.4f}\tmargin {margin:.4f}" if dist is not None else "")
                + "\n"
            )
    if res["failed"]:
        raise typer.Exit(1)
