"""A validated ``Config`` from dotted keys (``build``), from a nested tree (``from_dict``: a
preset, a checkpoint's stored config) and back (``to_yaml``, ``dotted``), and one ``--set``
override parsed (``parse_override``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ncmcli.config.checks import check
from ncmcli.config.schema import SCHEMA, Config, quote
from ncmcli.config.values import _unknown, coerce
from ncmcli.errors import ConfigError


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {quote(tree)}")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v and key not in SCHEMA:
                out.update(_flatten(v, key + "."))
            elif key in SCHEMA:
                raise ConfigError(
                    f"{key}: expected {getattr(SCHEMA[key], '__name__', 'a list')}, got a mapping"
                )
            # an empty mapping (e.g. 'loss:' with nothing under it) sets nothing
        else:
            out[key] = v
    return out


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config tree as {"section.key": value}, without validation (for reading runs)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(values: dict[str, Any]) -> Config:
    """A validated Config from flat dotted keys (unknown keys and bad values are errors)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, raw in values.items():
        val = coerce(key, raw)
        if "." in key:
            sec, sub = key.split(".", 1)
            sections.setdefault(sec, {})[sub] = val
        else:
            top[key] = val
    kwargs = dict(top)
    for f in dataclasses.fields(Config):
        if f.name in sections:
            kwargs[f.name] = f.default_factory()  # type: ignore[misc]
            kwargs[f.name] = dataclasses.replace(kwargs[f.name], **sections[f.name])
    cfg = Config(**kwargs)
    check(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=0.05' -> ('optim.lr', '0.05'); the value is coerced later, against the schema."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} must look like key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if key not in SCHEMA:
        raise _unknown(key)
    return key, value


def from_dict(tree: dict) -> Config:
    """A Config from a nested dict, e.g. one stored in a checkpoint."""
    return build(_flatten(tree))


def to_yaml(cfg: Config) -> str:
    import yaml  # here, not at the top: the library (checkpoint loading) never needs it

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
