"""The ``ncm`` command line. Thin: this module only creates the app, registers the commands
(each in its own module, named after it: its options and one call to the module of the same
name in ``ncmcli.commands``) and turns every failure
into one line on stderr and its exit code (2 usage/config, 1 runtime); ``--debug`` or
``NCM_DEBUG=1`` shows the traceback. This package is the only place that prints or exits.
torch is imported inside command bodies only, so ``ncm --help`` and argument errors stay fast.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from ncmcli import __version__
from ncmcli.cli import anchors, evaluate, export, predict, presets, report, train, verify
from ncmcli.cli.console import err, show
from ncmcli.cli.plot import plot_app
from ncmcli.errors import NcmError
from ncmcli.storage import FileNote

app = typer.Typer(
    help="Train and evaluate classifiers with anchor-based Nearest Class Mean losses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
_state = {"debug": os.environ.get("NCM_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ncm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.", metavar=""),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version.", metavar=""
    ),
) -> None:
    if debug:
        _state["debug"] = True


# The commands, in the order ``ncm --help`` lists them; each module holds one command's options
# and its one call into ``ncmcli.commands``.
app.command()(anchors.anchors)
app.command()(presets.presets)
app.command()(train.train)
app.command("eval")(evaluate.eval_)
app.command()(predict.predict)
app.command()(export.export)
app.command()(report.report)
app.command()(verify.verify)
app.add_typer(plot_app, name="plot")


def main() -> None:
    """Console entry point."""
    sys.exit(run())


def run(args: list[str] | None = None) -> int:
    """``ncm ARGS`` (default: the command line) in this process, returning its exit code: every
    failure becomes one line on stderr and its code (2 usage or config, 1 runtime, 128 + N for
    signal N). Tests call it through typer's CliRunner."""
    _state["debug"] = os.environ.get("NCM_DEBUG", "") not in ("", "0")
    if sys.stdout is None:  # started with stdout closed (>&-): the work still runs, its data goes nowhere
        sys.stdout = open(os.devnull, "w")
    with warnings.catch_warnings():
        warnings.simplefilter("always", FileNote)
        warnings.showwarning = _note  # a FileNote is one line on stderr
        return _run(args)


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, FileNote):
        err.print(f"[yellow]{show(str(message))}[/yellow]")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(args: list[str] | None) -> int:
    try:
        rv = app(args=args, prog_name="ncm", standalone_mode=False)
    except SystemExit as exc:
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":  # click's own EPIPE handling
            _quiet_broken_pipe()
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BrokenPipeError:
        _quiet_broken_pipe()
    except NcmError as exc:
        return _fail(str(exc), exc.exit_code, exc)
    except (typer.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/red]")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except PermissionError as exc:  # a folder or file turned read-only under a running command
        where = exc.filename or "a file"
        return _fail(f"cannot write {where}: permission denied ({exc.strerror or exc})", 1, exc)
    except Exception as exc:
        if _is_click_error(exc):  # bad flags or arguments, from click or typer's copy of it
            ctx = getattr(exc, "ctx", None)
            cmd = ctx.command_path if ctx is not None else "ncm"
            return _fail(f"{exc.format_message()} (see '{cmd} --help')", getattr(exc, "exit_code", 2), exc)
        # a bug or an unexpected environment: still one line
        return _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1, exc)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    return rv if isinstance(rv, int) else 0


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head -1``, a closed stdout): end quietly, as a program killed by
    SIGPIPE would (exit 141), without a message or a flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(128 + 13)


def _is_click_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _fail(message: str, code: int, exc: BaseException) -> int:
    if _state["debug"]:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    err.print(f"[red]error:[/red] {show(message)}")
    return code
