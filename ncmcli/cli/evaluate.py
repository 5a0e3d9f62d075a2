"""``ncm eval``: its options, and one call to ``commands.evaluate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ncmcli.cli.console import err, out_json, render_eval, safe_text


def eval_(
    target: Path = typer.Argument(..., help="A checkpoint, or a run folder (its best.safetensors)."),
    data_root: str | None = typer.Option(
        None, "--data-root", help="Where the dataset lives, if not where it was trained."
    ),
    device: str = typer.Option("auto", "--device"),
    limit: int = typer.Option(0, "--limit", help="Evaluate on a stratified sample of N test images."),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Images per forward pass (default: the checkpoint's train.eval_batch_size).",
    ),
    ood: str | None = typer.Option(
        None, "--ood", help="Open-set check against a dataset name or an image folder."
    ),
    ood_limit: int | None = typer.Option(
        None, "--ood-limit", help="A seeded sample of N open-set images (default: --limit; 0 = all)."
    ),
    ood_score: str | None = typer.Option(
        None,
        "--ood-score",
        help="The open-set score to headline: dist, margin, cac, msp or maxlogit (default: msp, measured best on real pairs); every score's AUROC is reported.",
    ),
    logit_adjust: float = typer.Option(
        0.0,
        "--logit-adjust",
        help="Post-hoc logit adjustment tau: predict with logits - tau * log(training prior).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON document, with the confusion matrix.", metavar=""
    ),
    which: str = typer.Option(
        "best",
        "--which",
        help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors).",
    ),
) -> None:
    """Accuracy, error, loss, per-class accuracy, long-tail metrics and feature diagnostics on the test split."""
    from ncmcli.commands.evaluate import eval_command

    res = eval_command(
        target,
        data_root=data_root,
        device=device,
        limit=limit,
        ood=ood,
        batch_size=batch_size,
        logit_adjust=logit_adjust,
        ood_score=ood_score,
        which=which,
        ood_limit=ood_limit,
    )
    for warning in res.get("ood", {}).get("warnings", []):
        err.print(f"warning: {safe_text(warning)}", markup=False)
    if as_json:
        out_json(res)
        return
    render_eval(res, Console(soft_wrap=True))
