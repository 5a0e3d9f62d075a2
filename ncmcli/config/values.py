"""Values as the schema's types: ``coerce`` parses what YAML or ``--set`` gave (PyYAML reads
``1e-3`` as a string and ``no`` as a boolean, so strings are parsed here against the schema),
and the few keys with their own syntax (``loss.scale``, lists of integers, ``optim.betas``,
``data.imbalance``)."""

from __future__ import annotations

import typing
from typing import Any

from ncmcli import registry
from ncmcli.config.schema import SCHEMA, quote
from ncmcli.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unknown(key: str) -> ConfigError:
    return ConfigError(f"unknown key {quote(key)}" + registry.suggest(key, SCHEMA, cutoff=0.5))


def coerce(key: str, value: Any) -> Any:
    """``value`` (from YAML or from the command line) as the type of ``key``, or an error.

    PyYAML (YAML 1.1) reads ``1e-3`` as a string and ``no`` as a boolean, so strings are
    parsed against the schema here, and a boolean where a string belongs is refused with a
    hint to quote it rather than silently turned into 'False'."""
    if key not in SCHEMA:
        raise _unknown(key)
    typ = SCHEMA[key]
    if typing.get_origin(typ) is tuple:
        return _coerce_int_list(key, value)
    if key == "loss.scale":
        return _coerce_scale(key, value)
    if key == "data.augment":
        if isinstance(value, str) and value.strip().lower() == "randomresizedcrop":
            return "randomresizedcrop"
        try:
            return _coerce_as(key, value, bool)
        except ConfigError:
            raise ConfigError(
                f"{key}: expected bool (true or false) or randomresizedcrop, got {quote(value)}"
            ) from None
    return _coerce_as(key, value, typ)


def _coerce_as(key: str, value: Any, typ: type) -> Any:
    bad = ConfigError(f"{key}: expected {typ.__name__}, got {quote(value)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    as_float = float(value.strip())
                except ValueError:
                    raise bad from None
                if as_float.is_integer() and abs(as_float) < 2**53:
                    return int(as_float)
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: must be a finite number, got {quote(value)}")
        return out
    if typ is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"{key}: expected a string, got the boolean {str(value).lower()} "
                f"(YAML reads yes/no/on/off as booleans: quote the value)"
            )
        if isinstance(value, (int, float, str)):
            return str(value)
        raise bad
    raise bad  # pragma: no cover - the schema only holds the four types above


SCALE_WORDS = ("auto", "learn")


def _coerce_scale(key: str, value: Any) -> float | str:
    """``loss.scale``: a positive number, or one of SCALE_WORDS."""
    if isinstance(value, str) and value.strip().lower() in SCALE_WORDS:
        return value.strip().lower()
    try:
        return _coerce_as(key, value, float)
    except ConfigError:
        raise ConfigError(f"{key}: expected a number > 0, auto or learn, got {quote(value)}") from None


def is_fixed_scale(scale: float | str) -> bool:
    return not isinstance(scale, str)


def _coerce_int_list(key: str, value: Any) -> tuple[int, ...]:
    """A list of integers from YAML (``[5000, 7500]``) or the command line (``5000,7500``,
    ``[5000,7500]``, or empty for none)."""
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        value = [part for part in text.split(",") if part.strip()] if text else []
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of integers such as 30,60, got {quote(value)}")
    return tuple(_coerce_as(key, v, int) for v in value)


def parse_betas(text: str) -> tuple[float, float]:
    b1, b2 = (float(v) for v in text.strip("()[] ").split(","))
    return b1, b2


def _betas_ok(text: str) -> bool:
    try:
        return all(0 <= b < 1 for b in parse_betas(text))
    except ValueError:
        return False


IMBALANCE_KINDS = ("exp", "step")


def _imbalance_ok(text: str) -> bool:
    if text == "":
        return True
    kind, sep, factor = text.partition(":")
    try:
        return kind in IMBALANCE_KINDS and bool(sep) and 1 <= float(factor) <= 10000
    except ValueError:
        return False
