"""`ncm plot ...`: the plotting sub-commands."""

from __future__ import annotations

from pathlib import Path

import typer

from ncmcli.cli.console import err, show

plot_app = typer.Typer(
    help="Draw Figures 2 and 3, confusion matrices and angle histograms (needs matplotlib).",
    no_args_is_help=True,
)
_OUT = typer.Option(None, "--out", "-o", help="File or folder to write (default: beside the checkpoint).")
_FMT = typer.Option("png", "--format", help="png, svg or pdf.")
_WHICH = typer.Option("best", "--which", help="With a run folder: best or last (the final epoch).")


def _plot(kind: str, target, **kw) -> None:
    from ncmcli.commands.plot import plot_command

    path = plot_command(kind, target, **kw)
    err.print(f"wrote {show(str(path))}")


@plot_app.command("features")
def plot_features(
    checkpoint: Path = typer.Argument(..., help="A checkpoint or run folder."),
    split: str = typer.Option("test", "--split", help="train or test."),
    max_points: int = typer.Option(5000, "--max-points", help="Draw at most this many features (0 = all)."),
    data_root: str | None = typer.Option(None, "--data-root"),
    device: str = typer.Option("auto", "--device"),
    out: Path | None = _OUT,
    fmt: str = _FMT,
    which: str = _WHICH,
) -> None:
    """The paper's Figure 2: deep features by class, anchors as stars (PCA when d > 2)."""
    _plot(
        "features",
        checkpoint,
        out=out,
        fmt=fmt,
        device=device,
        split=split,
        max_points=max_points,
        data_root=data_root,
        which=which,
    )


@plot_app.command("curves")
def plot_curves(
    runs: list[Path] = typer.Argument(..., help="Run folders (or folders that contain them)."),
    out: Path | None = _OUT,
    fmt: str = _FMT,
) -> None:
    """The paper's Figure 3: training loss and test error per epoch, runs overlaid."""
    _plot("curves", runs, out=out, fmt=fmt)


@plot_app.command("confusion")
def plot_confusion(
    checkpoint: Path = typer.Argument(...),
    data_root: str | None = typer.Option(None, "--data-root"),
    device: str = typer.Option("auto", "--device"),
    out: Path | None = _OUT,
    fmt: str = _FMT,
    which: str = _WHICH,
) -> None:
    """Row-normalised confusion matrix on the test split."""
    _plot("confusion", checkpoint, out=out, fmt=fmt, device=device, data_root=data_root, which=which)


@plot_app.command("angles")
def plot_angles(
    checkpoint: Path = typer.Argument(...),
    data_root: str | None = typer.Option(None, "--data-root"),
    max_points: int = typer.Option(0, "--max-points"),
    device: str = typer.Option("auto", "--device"),
    out: Path | None = _OUT,
    fmt: str = _FMT,
    which: str = _WHICH,
) -> None:
    """Angles from each test feature to its own anchor and to the nearest other one."""
    _plot(
        "angles",
        checkpoint,
        out=out,
        fmt=fmt,
        device=device,
        data_root=data_root,
        max_points=max_points,
        which=which,
    )
