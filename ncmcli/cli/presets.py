"""``ncm presets``: one line per preset."""

from __future__ import annotations

import sys


def presets() -> None:
    """List the presets, each with its one-line description."""
    from ncmcli.commands.presets import presets_command

    items = presets_command()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        sys.stdout.write(f"{name:<{width}}  {desc}\n")
