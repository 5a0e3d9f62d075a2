"""Errors a user can act on. The CLI turns each into one line on stderr and its exit code."""

import contextlib


class NcmError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class UsageError(NcmError):
    """Bad arguments, config or presets: the user must change the command."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """An invalid config key, value or preset. Also a ValueError, so that a caller that does
    not know ncm's errors catches it as one. The library (``ncmcli.nn``) never raises it: its
    constructors raise plain ValueError and TypeError, and the app turns a ValueError into a
    ConfigError where it hands config values over (``config_boundary``)."""


@contextlib.contextmanager
def config_boundary(prefix: str = ""):
    """Where the app hands config or command-line values to the library: a ValueError the
    library raises for a bad value becomes a ConfigError (one line, exit code 2), with
    ``prefix`` before its message; ncm's own errors pass through, and ``--debug`` shows the
    library's traceback as the cause."""
    try:
        yield
    except NcmError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{prefix}{exc}") from exc


class DataError(NcmError):
    """A dataset that is missing, unreadable or malformed."""


def special_file(path) -> str | None:
    """What a path is when it exists but is not a regular file or a folder ("a FIFO", "a
    socket", "a device"), else None. ncm never opens such a path: reading one can block forever."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


class CheckpointError(NcmError):
    """A checkpoint that is missing, corrupt, truncated or not ncm's."""


class ImageError(NcmError):
    """An input image that cannot be decoded."""
