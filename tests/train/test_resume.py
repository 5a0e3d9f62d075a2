"""ncmcli/train/resume.py: a run killed (SIGKILL) at any named write point of a 3-epoch run
resumes to files bit-identical to an uninterrupted run's, or is refused in one line; the
repairs a resume makes to metrics.jsonl; a finished run without result.json gets one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from ncmcli.runs.ckfile import CheckpointFile
from ncmcli.train.resume import repair_metrics

RUN = [
    "train",
    "--preset",
    "quickstart",
    "--set",
    "train.epochs=3",
    "--set",
    "data.limit_train=300",
    "--set",
    "data.limit_test=100",
    "--set",
    "train.batch_size=100",
    "--quiet",
]
TIMING = {"epoch_time_s", "images_per_s", "wall_time_s", "train_images_per_s"}
# Paths differ between two folders; a resumed run's result.json does not know the preset and
# overrides the run started with (a known gap, noted in RELIABILITY.md).
PATHS = {"run_dir", "checkpoint", "last_checkpoint", "preset", "overrides"}


def _ncm(*args, crash: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread everywhere: bit-identical sums
    env.pop("NCM_DEBUG", None)
    head = (
        [sys.executable, str(REPO / "tests" / "crashpoint.py"), crash[0], str(crash[1])]
        if crash
        else [
            sys.executable,
            "-m",
            "ncmcli",
        ]
    )
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def _state(run: Path) -> dict:
    """What must be bit-identical: every tensor of both checkpoints, their metadata but the run
    id and times, every metrics line and result.json (times and paths aside)."""
    out = {}
    for name in ("best.safetensors", "last.safetensors"):
        f = CheckpointFile.read(run / name)
        meta = {k: v for k, v in f.meta.items() if k not in ("run_id", "metrics", "train_state")}
        state = json.loads(f.meta.get("train_state", "{}"))
        progress = state.get("progress", {})
        progress.pop("train_time", None)
        progress["best"] = {k: v for k, v in (progress.get("best") or {}).items() if k not in TIMING}
        metrics = {k: v for k, v in json.loads(f.meta["metrics"]).items() if k not in TIMING}
        out[name] = ({k: v.numpy().tobytes() for k, v in f.tensors().items()}, meta, metrics, state)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out["metrics"] = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]
    result = json.loads((run / "result.json").read_text())
    out["result"] = {k: v for k, v in result.items() if k not in TIMING | PATHS}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _ncm(*RUN, "--out", run)
    assert proc.returncode == 0, proc.stderr
    return _state(run)


POINTS = [
    *[(f"{when}:last.safetensors", n) for n in (1, 2, 3) for when in ("before", "after")],
    *[(f"{when}:metrics.jsonl", n) for n in (1, 2, 3) for when in ("before", "after")],
    *[(f"{when}:best.safetensors", 1) for when in ("before", "after")],
    ("before:result.json", 1),
]


@pytest.mark.slow  # two runs of ncm per write point
@pytest.mark.parametrize("point,n", POINTS, ids=[f"{p}#{n}" for p, n in POINTS])
def test_a_kill_at_any_write_point_resumes_bit_identical(tmp_path, reference, point, n):
    run = tmp_path / "run"
    killed = _ncm(*RUN, "--out", run, crash=(point, n))
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no handler ran
    resumed = _ncm("train", "--resume", run, "--quiet")
    if not (run / "last.safetensors").exists():  # killed before the first resumable file
        assert resumed.returncode == 2 and "not a resumable run folder" in resumed.stderr
        assert len(resumed.stderr.strip().splitlines()) == 1 and "Traceback" not in resumed.stderr
        return
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert _state(run) == reference
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def test_the_crash_helper_kills_where_it_is_told(tmp_path):
    """The control for the test above: a kill after the second last-checkpoint rename leaves
    epoch 2's checkpoint and one metrics line, before epoch 2's line was appended."""
    run = tmp_path / "run"
    killed = _ncm(*RUN, "--out", run, crash=("after:last.safetensors", 2))
    assert killed.returncode == -9
    assert CheckpointFile.read(run / "last.safetensors").meta["epoch"] == "2"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def _line(epoch: int) -> str:
    return json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch})


def test_repair_drops_a_torn_line_and_rebuilds_a_missing_one(tmp_path):
    path, notes = tmp_path / "metrics.jsonl", []
    path.write_text(_line(1) + "\n" + _line(2)[:9])  # epoch 2 torn mid-append
    repair_metrics(tmp_path, 2, json.loads(_line(2)), notes.append)
    assert path.read_text() == _line(1) + "\n" + _line(2) + "\n"
    assert any("torn" in n for n in notes) and any("rebuilt epoch 2" in n for n in notes)


def test_repair_drops_lines_past_the_checkpoint_and_leaves_a_good_file_alone(tmp_path):
    path, notes = tmp_path / "metrics.jsonl", []
    good = "".join(_line(e) + "\n" for e in (1, 2))
    path.write_text(good + _line(3) + "\n")
    repair_metrics(tmp_path, 2, {}, notes.append)
    assert path.read_text() == good and len(notes) == 1
    mtime = path.stat().st_mtime_ns
    repair_metrics(tmp_path, 2, json.loads(_line(2)), notes.append)
    assert path.stat().st_mtime_ns == mtime and len(notes) == 1


def test_a_torn_line_is_never_glued_to_the_next_epoch(tmp_path):
    """The bug this fixes: an append after a torn line joined the two into one bad line."""
    run = tmp_path / "run"
    assert _ncm(*RUN[:4], "train.epochs=1", *RUN[5:], "--out", run).returncode == 0
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "trai')
    proc = _ncm("train", "--resume", run, "--set", "train.epochs=2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
