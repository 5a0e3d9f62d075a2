"""Errors a user can act on. The CLI turns each into one line on stderr and its exit code."""


class NcmError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class UsageError(NcmError):
    """Bad arguments, config or presets: the user must change the command."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid config key, value or preset."""


class DataError(NcmError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(NcmError):
    """A checkpoint that is missing, corrupt, truncated or not ncm's."""


class ImageError(NcmError):
    """An input image that cannot be decoded."""
