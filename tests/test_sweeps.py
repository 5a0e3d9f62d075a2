"""Sweeps that cannot lie: required presets, validation-selected checkpoints, run folders
that never mix two runs, and a lock against two writers."""

import json
import os

import pytest
import torch

from conftest import assert_clean_error
from ncmcli.config.presets import resolve
from ncmcli.engine import Reporter
from ncmcli.train.loop import train

TINY = ["--set", "train.epochs=1", "--set", "data.limit_train=128", "--set", "data.limit_test=64", "--quiet"]


def test_train_without_a_preset_is_a_usage_error(cli, tmp_path):
    proc = cli("train", "--out", tmp_path / "r")
    assert_clean_error(proc, 2, "--preset quickstart")
    assert "ncm presets" in proc.stderr and not (tmp_path / "r").exists()


def test_best_is_selected_on_validation_accuracy_when_there_is_a_validation_split(tmp_path):
    cfg = resolve("quickstart", ["data.limit_train=600", "data.limit_test=200", "data.val_split=0.25",
                                 "train.epochs=4", "train.batch_size=64", "optim.lr=0.2", "train.num_threads=1"])
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
    assert_clean_error(cli("train", "--resume", tmp_path / "r", "--set", "train.epochs=1"), 2, "would shorten it")


def test_out_into_a_foreign_non_empty_folder_is_refused(cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert_clean_error(cli("train", "--preset", "quickstart", *TINY, "--out", tmp_path / "mine", "--force"), 2,
                       "not a run folder")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_name_sets_the_run_folder_prefix(cli, tmp_path):
    proc = cli("train", "--preset", "quickstart", *TINY, "--runs", tmp_path, "--name", "lr-sweep-0.1")
    assert proc.returncode == 0, proc.stderr
    (made,) = list(tmp_path.iterdir())
    assert made.name.startswith("lr-sweep-0.1-")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_force_empties_the_old_runs_files(ncm, tmp_path):
    out = tmp_path / "r"
    assert ncm("train", "--preset", "quickstart", *TINY, "--set", "train.epochs=2", "--out", out).returncode == 0
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
    assert ncm("train", "--preset", "quickstart", *TINY, "--out", out).returncode == 0  # the lock died with it


@pytest.mark.slow
def test_resume_while_the_run_is_in_use_is_refused(ncm, tmp_path):
    from ncmcli.runs.runfiles import FolderLock

    out = tmp_path / "r"
    assert ncm("train", "--preset", "quickstart", *TINY, "--out", out).returncode == 0
    with FolderLock(out):
        assert_clean_error(ncm("train", "--resume", out, "--set", "train.epochs=2"), 1, "in use by another ncm process")
