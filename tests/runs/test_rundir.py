"""RunDir, the one owner of a run folder's files, and the sweeps it keeps honest: required
presets, validation-selected checkpoints (``--which best|last``), run folders that never mix
two runs, and a lock against two writers."""

import json
import os

import pytest
import torch
from conftest import assert_clean_error, capped

from ncmcli.config.presets import resolve
from ncmcli.runs import runfiles
from ncmcli.runs.rundir import RunDir, find_runs, run_id_of_config
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter


def test_rundir_names_every_file_and_round_trips_its_text_files(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    assert (run.config.name, run.last.name, run.best.name, run.result_file.name, run.metrics_file.name) == (
        runfiles.CONFIG,
        runfiles.LAST,
        runfiles.BEST,
        runfiles.RESULT,
        runfiles.METRICS,
    )
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
    assert_clean_error(
        capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config in last"
    )
    (a / "config.yaml").write_text(text)
    (a / "last.safetensors").write_bytes((b / "last.safetensors").read_bytes())  # another run's, another net
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "belongs to another run")
    (a / "config.yaml").write_text(text.split("\n", 1)[1])  # no run id: the config check still holds
    assert_clean_error(
        capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config"
    )


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_partial_metrics_line_is_skipped_with_a_note(two_runs):
    a, _ = two_runs
    with open(a / "metrics.jsonl", "a") as fh:
        fh.write('\n{"epoch": 2, "train_lo')
    proc = capped("train", "--resume", a, "--set", "train.epochs=2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The resume drops the torn line with a note (train.resume.repair_metrics); the new epoch's
    # line stands on its own.
    assert "dropped the torn last line" in proc.stderr and json.loads(proc.stdout)["final"]["epoch"] == 2
    assert [json.loads(x)["epoch"] for x in (a / "metrics.jsonl").read_text().splitlines() if x] == [1, 2]


def test_train_without_a_preset_is_a_usage_error(cli, tmp_path):
    proc = cli("train", "--out", tmp_path / "r")
    assert_clean_error(proc, 2, "--preset quickstart")
    assert "ncm presets" in proc.stderr and not (tmp_path / "r").exists()


def test_best_is_selected_on_validation_accuracy_when_there_is_a_validation_split(tmp_path):
    cfg = resolve(
        "quickstart",
        [
            "data.limit_train=600",
            "data.limit_test=200",
            "data.val_split=0.25",
            "train.epochs=4",
            "train.batch_size=64",
            "optim.lr=0.2",
            "train.num_threads=1",
        ],
    )
    result = train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in m and "val_loss" in m for m in lines)
    best_epoch = max(lines, key=lambda m: (m["val_acc"], -m["epoch"]))["epoch"]
    assert result["best_selected_on"] == "validation" and result["best"]["epoch"] == best_epoch
    assert result["best"]["val_acc"] == lines[best_epoch - 1]["val_acc"]
    from ncmcli.runs import checkpoint

    assert checkpoint.load(tmp_path / "best.safetensors").epoch == best_epoch


def test_validation_split_is_stratified_and_disjoint_from_train():
    from ncmcli.data.datasets import load_dataset

    cfg = resolve("quickstart", ["data.val_split=100"])
    ds = load_dataset(cfg.data)
    assert len(ds.val) == 100 and ds.val.labels.bincount().tolist() == [10] * 10
    assert len(ds.train) == 5000 - 100
    train_rows = {bytes(x.flatten().tolist()) for x in ds.train.images}
    assert not any(bytes(x.flatten().tolist()) in train_rows for x in ds.val.images[:20])
    with pytest.raises(Exception, match="val_split"):
        resolve("quickstart", ["data.val_split=2.5"])


def test_without_validation_result_says_best_was_selected_on_test(tmp_path):
    cfg = resolve("quickstart", ["data.limit_train=128", "data.limit_test=64", "train.epochs=1"])
    result = train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    assert result["best_selected_on"] == "test" and result["status"] == "completed"


def test_resume_cannot_shorten_a_run(cli, tmp_path):
    proc = cli("train", "--preset", "quickstart", *TINY, "--set", "train.epochs=2", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(
        cli("train", "--resume", tmp_path / "r", "--set", "train.epochs=1"), 2, "would shorten it"
    )


def test_out_into_a_foreign_non_empty_folder_is_refused(cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert_clean_error(
        cli("train", "--preset", "quickstart", *TINY, "--out", tmp_path / "mine", "--force"),
        2,
        "not a run folder",
    )
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_name_sets_the_run_folder_prefix(cli, tmp_path):
    proc = cli("train", "--preset", "quickstart", *TINY, "--runs", tmp_path, "--name", "lr-sweep-0.1")
    assert proc.returncode == 0, proc.stderr
    (made,) = list(tmp_path.iterdir())
    assert made.name.startswith("lr-sweep-0.1-")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_force_empties_the_old_runs_files(ncm, tmp_path):
    out = tmp_path / "r"
    assert (
        ncm("train", "--preset", "quickstart", *TINY, "--set", "train.epochs=2", "--out", out).returncode == 0
    )
    assert ncm("train", "--preset", "quickstart", *TINY, "--out", out, "--force").returncode == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1  # no line of the old run


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_holders_pid(ncm, tmp_path):
    from ncmcli.runs.runfiles import FolderLock

    out = tmp_path / "r"
    out.mkdir()
    with FolderLock(out):  # this test process plays the running trainer
        proc = ncm("train", "--preset", "quickstart", *TINY, "--out", out, "--force")
        assert_clean_error(proc, 1, f"PID {os.getpid()}")
    assert not (out / "config.yaml").exists()  # nothing was cleared or written
    assert (
        ncm("train", "--preset", "quickstart", *TINY, "--out", out).returncode == 0
    )  # the lock died with it


@pytest.mark.slow
def test_resume_while_the_run_is_in_use_is_refused(ncm, tmp_path):
    from ncmcli.runs.runfiles import FolderLock

    out = tmp_path / "r"
    assert ncm("train", "--preset", "quickstart", *TINY, "--out", out).returncode == 0
    with FolderLock(out):
        assert_clean_error(
            ncm("train", "--resume", out, "--set", "train.epochs=2"), 1, "in use by another ncm process"
        )


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_tiny_validation_split_warns_and_best_follows_the_last_epoch(tmp_path, cli):
    out = tmp_path / "run"
    proc = cli(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=2",
        "--set",
        "data.limit_train=300",
        "--set",
        "data.limit_test=100",
        "--set",
        "data.val_split=24",
        "--out",
        out,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "only 24 images (one is 4.2 points" in proc.stderr and "follows the last epoch" in proc.stderr
    res = json.loads(proc.stdout)
    assert res["best_selected_on"] == "last epoch" and res["best"]["epoch"] == 2
    proc = cli(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=1000",
        "--set",
        "data.limit_test=100",
        "--set",
        "data.val_split=100",
        "--out",
        tmp_path / "r2",
        "--json",
    )
    assert "best.safetensors may be chosen by noise" in proc.stderr
    assert json.loads(proc.stdout)["best_selected_on"] == "validation"


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_which_last_on_eval_predict_export_and_plot(tmp_path, cli):
    from ncmcli.data.fakedata import make_folder

    out = tmp_path / "run"
    assert (
        cli(
            "train",
            "--preset",
            "quickstart",
            "--set",
            "train.epochs=2",
            "--set",
            "data.limit_train=300",
            "--set",
            "data.limit_test=100",
            "--out",
            out,
        ).returncode
        == 0
    )
    best_epoch = json.loads((out / "result.json").read_text())["best"]["epoch"]
    ev = json.loads(cli("eval", out, "--which", "last", "--json").stdout)
    assert ev["checkpoint"].endswith("last.safetensors") and ev["epoch"] == 2
    assert json.loads(cli("eval", out, "--json").stdout)["epoch"] == best_epoch
    make_folder(tmp_path / "imgs", classes=("a",), per_class=1, size=(28, 28), mode="L")
    pred = json.loads(
        cli("predict", tmp_path / "imgs", "--checkpoint", out, "--which", "last", "--json").stdout
    )
    assert pred["checkpoint"].endswith("last.safetensors")
    proc = cli("export", out, "--which", "last", "--format", "torchscript")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("last.torchscript.pt"), proc.stderr
    proc = cli("plot", "confusion", out, "--which", "last", "--out", tmp_path / "c.png")
    assert proc.returncode == 0 and (tmp_path / "c.png").is_file(), proc.stderr
    assert_clean_error(cli("eval", out, "--which", "newest"), 2, "--which must be best or last")
