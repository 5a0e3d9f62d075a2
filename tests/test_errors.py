"""ncmcli/errors.py: the boundary that turns a library ValueError into a config error, and
the exit codes the CLI reads off each error."""

import pytest

from ncmcli.errors import CheckpointError, ConfigError, NcmError, UsageError, config_boundary


def test_config_boundary_turns_a_library_value_error_into_a_config_error():
    with pytest.raises(ConfigError, match="^--extend: bad slot$") as exc:
        with config_boundary("--extend: "):
            raise ValueError("bad slot")
    assert exc.value.exit_code == 2 and isinstance(exc.value.__cause__, ValueError)  # --debug shows it


def test_config_boundary_passes_ncm_errors_and_other_exceptions_through():
    for error in (CheckpointError("torn"), UsageError("no")):
        with pytest.raises(type(error)) as exc:
            with config_boundary():
                raise error
        assert exc.value is error
    with pytest.raises(TypeError):  # a wrong type is a bug of the caller, not a config value
        with config_boundary():
            raise TypeError("3 is not callable")
    with config_boundary():
        pass


def test_exit_codes():
    assert (
        NcmError().exit_code,
        UsageError().exit_code,
        ConfigError().exit_code,
        CheckpointError().exit_code,
    ) == (1, 2, 2, 1)
    assert isinstance(ConfigError(), ValueError)
