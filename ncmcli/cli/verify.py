"""``ncm verify``: its arguments, and one call to ``commands.verify``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ncmcli.cli.console import out_json, safe_text


def verify(
    paths: list[Path] = typer.Argument(
        ..., help="Checkpoints, run folders, or folders of .safetensors files."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON document: a record per path.", metavar=""),
) -> None:
    """Check files of tensors against the digests they were written with: one line per path
    (ok, no-digest, corrupt or unreadable); exit 1 if any is corrupt or unreadable."""
    from ncmcli.commands.verify import verify_command

    records = verify_command(paths)
    if as_json:
        out_json({"results": records})
    else:
        for r in records:
            sys.stdout.write(f"{safe_text(r['path'])}: {r['status']} ({safe_text(r['detail'])})\n")
    if any(r["status"] in ("corrupt", "unreadable") for r in records):
        raise typer.Exit(1)
