"""Benchmarks cannot rot: each one runs with --dry-run (tiny sizes) and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_every_benchmark_is_listed():
    assert SCRIPTS == [
        "convergence.py",
        "cpu_net.py",
        "decode.py",
        "digest_cost.py",
        "export_speed.py",
        "gpu.py",
        "incremental_table.py",
        "loss_overhead.py",
        "pipeline_efficiency.py",
        "startup.py",
        "study_table.py",
        "vs_dataloader.py",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_dry_run(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"NCM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 3, proc.stdout  # a header and at least one measured row
    assert "Traceback" not in proc.stderr


def test_benchmarks_import_nothing_private_and_do_not_touch_sys_path():
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "_Step" not in text and "helpers_data" not in text, path.name


def test_convergence_check_reports_range_and_least_squares_trend(tmp_path):
    import json

    import torch

    errors = [40 - 0.5 * e for e in range(16)] + [30.4, 29.9, 30.1, 30.3]  # 20 epochs; last fifth 17..20
    run = tmp_path / "sweep" / "r"
    run.mkdir(parents=True)
    rows = [{"epoch": e + 1, "test_error_pct": v, "train_acc": 0.9} for e, v in enumerate(errors)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(
        [sys.executable, str(BENCH / "convergence.py"), str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("r "))
    tail = torch.tensor([r["test_error_pct"] for r in rows[-4:]], dtype=torch.float64)  # last fifth: 4 of 20
    x = torch.arange(4, dtype=torch.float64)
    slope = ((x - x.mean()) * (tail - tail.mean())).sum() / ((x - x.mean()) ** 2).sum()
    _, epochs, span, moved, converged, change, acc = line.split()
    assert (epochs, span, converged, acc) == ("20", "17-20", "no", "90.0%")
    assert float(moved) == pytest.approx((tail.max() - tail.min()).item(), abs=0.006)
    assert float(change) == pytest.approx(3 * slope.item(), abs=0.006)


def test_study_table_is_the_mean_and_std_of_each_cells_runs(tmp_path):
    import statistics

    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "study_table.py"),
            "--dry-run",
            "--columns",
            "error,train_acc,scale,auroc_dist,tail,la_acc",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    header, _, row = proc.stdout.strip().splitlines()
    cells = dict(
        zip([h.strip() for h in header.strip("|").split("|")], [v.strip() for v in row.strip("|").split("|")])
    )
    assert cells["n"] == "2" and cells["test error %"] == f"11.00 ± {statistics.stdev([10.0, 12.0]):.2f}"
    assert cells["train acc %"] == f"85.00 ± {statistics.stdev([90.0, 80.0]):.2f}"
    assert cells["final s"] == "3.50 ± 0.71" and cells["AUROC dist"] == "0.3000 ± 0.1414"
    assert cells["tail %"] == "42.50 ± 3.54" and cells["acc % (post-hoc LA)"] == ""  # no eval-la1.json


def test_incremental_table_is_accuracy_after_each_task_and_mean_forgetting(tmp_path):
    import json

    chain = tmp_path / "arm-s0"
    evals = [
        {"accuracy": 0.98, "per_class_accuracy": {"a": 0.97, "b": 0.99}},
        {"accuracy": 0.60, "per_class_accuracy": {"a": 0.99, "b": 0.50, "c": 0.8, "d": 0.6}},
        {
            "accuracy": 0.40,
            "per_class_accuracy": {"a": 0.10, "b": 0.30, "c": 0.2, "d": 0.4, "e": 1.0, "f": 0.9},
            "tasks": [{"classes": ["a", "b"]}, {"classes": ["c", "d"]}, {"classes": ["e", "f"]}],
        },
    ]
    for t, ev in enumerate(evals, 1):
        (chain / f"t{t}").mkdir(parents=True)
        (chain / f"t{t}" / "eval.json").write_text(json.dumps(ev))
    proc = subprocess.run(
        [sys.executable, str(BENCH / "incremental_table.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    row = [c.strip() for c in proc.stdout.splitlines()[2].strip("|").split("|")]
    # best minus final for a, b, c, d: (0.99-0.10), (0.99-0.30), (0.8-0.2), (0.6-0.4)
    forgetting = 100 * ((0.99 - 0.10) + (0.99 - 0.30) + (0.8 - 0.2) + (0.6 - 0.4)) / 4
    assert row == ["arm", "1", "98.00", "60.00", "40.00", "40.00", f"{forgetting:.2f}"]


@pytest.mark.slow
def test_device_check_dry_run_trains_resumes_bit_identically_and_writes_one_summary(tmp_path):
    import json
    import os

    env = dict(
        os.environ,
        NCM=str(Path(sys.executable).parent / "ncm"),
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    proc = subprocess.run(
        ["bash", str(BENCH / "device-check.sh"), "--dry-run", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "device-check.json").read_text())
    assert summary["dry_run"] and summary["ok"], summary
    assert set(summary["runs"]) == {
        "quickstart",
        "cifar10-fp32",
        "compile-fp16-ema",
        "resume-straight",
        "resume-resumed",
        "torchrun",
    }
    assert all(r["exit_code"] == 0 and r["sync_warnings"] == 0 for r in summary["runs"].values())
    assert (
        summary["resume"]["stopped_at"]["status"] == "interrupted"
        and summary["resume"]["bit_identical"] is True
    )
    assert {p: len(g["rows"]) for p, g in summary["gpu"].items()} == {"fp32": 3, "bf16": 3}
