"""Presets: YAML files with ``base:`` inheritance, read safely (no aliases, bounded depth and
size), and resolved with ``--set`` overrides into a validated ``Config``. Imports no torch."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

from ncmcli import registry
from ncmcli.config.overrides import _flatten, build, parse_override
from ncmcli.config.schema import Config, quote
from ncmcli.errors import ConfigError, special_file

MAX_PRESET_BYTES = 64 * 1024  # presets are a few hundred bytes; a bigger file is a mistake or an attack
MAX_YAML_DEPTH = 16  # the schema is two levels deep


def presets_dir() -> Path:
    """Presets ship inside the wheel as ncmcli/presets; a checkout keeps them at the root."""
    here = Path(__file__).resolve().parents[1]  # ncmcli/
    for cand in (here / "presets", here.parent / "presets"):
        if cand.is_dir():
            return cand
    raise ConfigError(f"no presets folder found next to {here}")  # pragma: no cover


def list_presets() -> dict[str, str]:
    """name -> one-line description, for every preset a user runs. Bases (``_paper``,
    ``_cifar10``, ...) hold shared recipe keys and are hidden."""
    out = {}
    for path in sorted(presets_dir().glob("*.yaml")):
        if path.stem.startswith("_"):
            continue
        try:
            desc = str(_resolve_tree(path.stem, ()).get("description", ""))
        except ConfigError as exc:
            desc = f"(broken: {exc})"
        out[path.stem] = desc
    return out


def _preset_path(name: str, near: Path | None = None) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if near is not None and not p.is_absolute():
            p = near / p
        if not p.is_file():
            kind = special_file(p)
            raise ConfigError(
                f"preset file {quote(str(p))} is {kind}, not a regular file"
                if kind
                else f"preset file not found: {quote(str(p))}"
            )
        return p
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        names = sorted(q.stem for q in presets_dir().glob("*.yaml") if not q.stem.startswith("_"))
        raise ConfigError(
            f"unknown preset {quote(name)}{registry.suggest(name, names)}; valid presets: {', '.join(names)}"
        )
    return path


def _read_yaml(path: Path) -> dict:
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    import copy

    # A preset is read once per process even when 40 others extend it (`ncm presets`).
    return copy.deepcopy(_read_yaml_cached(str(path.resolve()), stamp))


class _PresetLoader(yaml.SafeLoader):
    """yaml.SafeLoader for presets: no aliases (a few hundred bytes of ``*a`` references can
    expand to gigabytes, a "billion laughs"), and a bounded nesting depth."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"{self.name}: line {mark.line + 1}: YAML aliases (*name) are not allowed in presets; "
                "write the value out"
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{self.name}: line {mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str, name: str) -> Any:
    """YAML from a preset or a run folder's config.yaml: safe, alias-free, depth-bounded."""
    loader = _PresetLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.lru_cache(maxsize=256)
def _read_yaml_cached(path_text: str, _stamp: int) -> dict:
    path = Path(path_text)
    try:
        size = path.stat().st_size
        if size > MAX_PRESET_BYTES or not path.is_file():
            raise ConfigError(
                f"{path}: {'not a regular file' if not path.is_file() else f'{size:,} bytes'}; "
                f"a preset is a YAML file of at most {MAX_PRESET_BYTES // 1024} KiB"
            )
        tree = load_yaml_text(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {str(problem)[:120]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({str(exc)[:120]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_tree(name: str, chain: tuple[str, ...], near: Path | None = None) -> dict:
    """The merged tree of a preset. ``base:`` names one preset or a list of them, merged
    left to right, then the preset's own keys on top. A relative ``base:`` path resolves
    against the folder of the preset that names it."""
    path = _preset_path(name, near)
    key = str(path.resolve())
    if key in chain:
        raise ConfigError(f"preset '{name}' extends itself (cycle through {path.name})")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a preset name or a list of them")
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _resolve_tree(b, chain + (key,), path.parent))
    return _merge(merged, tree)


def resolve(preset: str | None, overrides: list[str] = ()) -> Config:
    """The config of a preset (name or YAML path) with ``--set`` overrides applied."""
    values = _flatten(_resolve_tree(preset, ())) if preset else {}
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return build(values)
