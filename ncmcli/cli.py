"""The ``ncm`` command line. Thin: parse, call one engine function, render the result.

This is the only module that prints or exits. Library errors (``NcmError``) become one red
line on stderr and their exit code (2 usage/config, 1 runtime); ``--debug`` or
``NCM_DEBUG=1`` shows the traceback. torch is imported inside command bodies only, so
``ncm --help`` and argument errors stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ncmcli import __version__
from ncmcli.errors import NcmError

app = typer.Typer(
    help="Train and evaluate classifiers with anchor-based Nearest Class Mean losses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
_state = {"debug": os.environ.get("NCM_DEBUG", "") not in ("", "0")}


def _out(doc) -> None:
    """Data goes to stdout, as one JSON document."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ncm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        _state["debug"] = True


# ---------------------------------------------------------------------------------------
@app.command()
def anchors(
    classes: int = typer.Option(..., "--classes", "-C", help="Number of classes C (>= 2)."),
    dim: int = typer.Option(..., "--dim", "-d", help="Feature dimension d (>= 1)."),
    method: str = typer.Option("auto", "--method", "-m", help="auto, orthogonal, polar, simplex, orthoplex, optimized, random, or a .safetensors/.csv file."),
    seed: int = typer.Option(0, "--seed", help="Seed for random and optimized."),
    metric: str = typer.Option("euclidean", "--metric", help="Distance for the loss floor: euclidean, cosine, sqeuclidean."),
    scale: float = typer.Option(1.0, "--scale", help="Loss scale for the loss floor."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the anchors to this .safetensors file (key 'anchors')."),
    as_json: bool = typer.Option(False, "--json", help="Print the certificate as one JSON document."),
) -> None:
    """Build fixed class anchors and print their certificate (angles, loss floor)."""
    from ncmcli import engine

    cert = engine.anchors_command(classes, dim, method, seed=seed, metric=metric, scale=scale, out=out)
    if out is not None:
        err.print(f"wrote {out}")
    if as_json:
        _out(cert)
    else:
        _render_certificate(cert, Console())


def _render_certificate(cert: dict, console: Console) -> None:
    from rich.table import Table

    best = cert["best_known_min_angle_deg"]
    t = Table(title=f"anchors: {cert['method']}  C={cert['classes']}  d={cert['dim']}", show_header=False)
    t.add_row("min angle", f"{cert['min_angle_deg']:.2f}°" + (f"  (best known {best:.2f}°)" if best else ""))
    t.add_row("mean / max angle", f"{cert['mean_angle_deg']:.2f}° / {cert['max_angle_deg']:.2f}°")
    t.add_row("row norms", f"{cert['norm_min']:.6f} .. {cert['norm_max']:.6f}")
    t.add_row("duplicates", str(len(cert["duplicates"])) if cert["duplicates"] else "none")
    t.add_row(
        "loss floor",
        f"{cert['loss_floor']:.4f} nats ({cert['metric']}, scale {cert['scale']:g}; "
        f"features exactly on their anchors)",
    )
    console.print(t)


# ---------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning every failure into one line and a code."""
    try:
        rv = app(prog_name="ncm", standalone_mode=False)
    except NcmError as exc:
        _fail(str(exc), exc.exit_code, exc)
    except (typer.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/red]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _is_click_error(exc):  # bad flags or arguments, from click or typer's copy of it
            ctx = getattr(exc, "ctx", None)
            cmd = ctx.command_path if ctx is not None else "ncm"
            _fail(f"{exc.format_message()} (see '{cmd} --help')", getattr(exc, "exit_code", 2), exc)
        # a bug or an unexpected environment: still one line
        _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1, exc)
    sys.exit(rv if isinstance(rv, int) else 0)


def _is_click_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _fail(message: str, code: int, exc: BaseException) -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    sys.exit(code)
