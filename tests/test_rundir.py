"""RunDir: the one owner of a run folder's files."""

import json

from ncmcli.runs.rundir import RunDir, find_runs, run_id_of_config
from ncmcli.runs import runfiles


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
