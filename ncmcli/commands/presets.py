"""``ncm presets``: the presets' names and one-line descriptions."""

from __future__ import annotations

from ncmcli.config.presets import list_presets


def presets_command() -> dict[str, str]:
    """Preset name -> its one-line description, in listing order."""
    return list_presets()
