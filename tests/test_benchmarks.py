"""Benchmarks cannot rot: each one runs with --dry-run (tiny sizes) and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_listed():
    assert SCRIPTS == ["convergence.py", "cpu_net.py", "export_speed.py", "gpu.py", "loss_overhead.py", "pipeline_efficiency.py", "startup.py",
                       "vs_dataloader.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_dry_run(script, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--dry-run"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={"NCM_CACHE": str(tmp_path / "cache"),
                                                          "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 3, proc.stdout  # a header and at least one measured row
    assert "Traceback" not in proc.stderr


def test_benchmarks_import_nothing_private_and_do_not_touch_sys_path():
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "_Step" not in text and "helpers_data" not in text, path.name
