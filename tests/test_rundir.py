"""RunDir: the one owner of a run folder's files."""

import json

from ncmcli.runs.rundir import RunDir, find_runs, run_id_of_config
from ncmcli.runs import runfiles
import pytest
from conftest import assert_clean_error, capped


def test_rundir_names_every_file_and_round_trips_its_text_files(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    assert (run.config.name, run.last.name, run.best.name, run.result_file.name, run.metrics_file.name) == (
        runfiles.CONFIG, runfiles.LAST, runfiles.BEST, runfiles.RESULT, runfiles.METRICS)
    assert not run.holds_run() and not run.is_resumable() and not run.has_result()
    run.write_config("seed: 3\n", "abc123", "# a note\n")
    assert run.config.read_text() == "# ncm run id: abc123\n# a note\nseed: 3\n"
    assert run.run_id() == "abc123" and run_id_of_config("seed: 3\n") is None and run.holds_run()
    run.write_result({"test_acc": 0.5})
    assert run.result() == {"test_acc": 0.5} and json.loads(run.result_file.read_text()) == {"test_acc": 0.5}
    run.append_metrics({"epoch": 1})
    run.append_metrics({"epoch": 2})
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    run.last.write_bytes(b"x")
    assert run.is_resumable() and run.checkpoint("best") == run.last  # best falls back to last
    (tmp_path / "other" / "deep").mkdir(parents=True)
    RunDir(tmp_path / "other" / "deep").write_result({})
    assert find_runs([tmp_path]) == [tmp_path / "other" / "deep", tmp_path / "r"]
    assert find_runs([tmp_path], runfiles.METRICS) == [tmp_path / "r"]


TINY = ["--set", "train.epochs=1", "--set", "data.limit_train=128", "--set", "data.limit_test=64", "--quiet"]


@pytest.fixture
def two_runs(tmp_path):
    for name, extra in (("a", []), ("b", ["--set", "model.arch=small"])):
        proc = capped("train", "--preset", "quickstart", *TINY, *extra, "--out", tmp_path / name, timeout=300)
        assert proc.returncode == 0, proc.stderr
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_resume_refuses_a_hand_edited_config_and_a_foreign_checkpoint(two_runs):
    a, b = two_runs
    text = (a / "config.yaml").read_text()
    (a / "config.yaml").write_text(text.replace("lr: 0.05", "lr: 0.5"))
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config in last")
    (a / "config.yaml").write_text(text)
    (a / "last.safetensors").write_bytes((b / "last.safetensors").read_bytes())  # another run's, another net
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "belongs to another run")
    (a / "config.yaml").write_text(text.split("\n", 1)[1])  # no run id: the config check still holds
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_partial_metrics_line_is_skipped_with_a_note(two_runs):
    a, _ = two_runs
    with open(a / "metrics.jsonl", "a") as fh:
        fh.write('\n{"epoch": 2, "train_lo')
    proc = capped("train", "--resume", a, "--set", "train.epochs=2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped line" in proc.stderr and json.loads(proc.stdout)["final"]["epoch"] == 2
