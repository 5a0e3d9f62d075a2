import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_ncm(*args, cwd=None, env=None, timeout=300):
    """Run the real CLI in a subprocess, as a user's shell would."""
    full_env = dict(os.environ)
    full_env.pop("NCM_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ncmcli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout,
    )


def assert_clean_error(proc, code, fragment=None):
    """One line on stderr, the expected exit code, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    if fragment:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture
def ncm():
    return run_ncm
