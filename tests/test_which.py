"""`best` against `last`: a validation split too small to choose on, and `--which` on every
command that reads a run folder's checkpoint."""

import json

import pytest

from conftest import assert_clean_error


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_tiny_validation_split_warns_and_best_follows_the_last_epoch(tmp_path, cli):
    out = tmp_path / "run"
    proc = cli("train", "--preset", "quickstart", "--set", "train.epochs=2", "--set", "data.limit_train=300",
               "--set", "data.limit_test=100", "--set", "data.val_split=24", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "only 24 images (one is 4.2 points" in proc.stderr and "follows the last epoch" in proc.stderr
    res = json.loads(proc.stdout)
    assert res["best_selected_on"] == "last epoch" and res["best"]["epoch"] == 2
    proc = cli("train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_train=1000",
               "--set", "data.limit_test=100", "--set", "data.val_split=100", "--out", tmp_path / "r2", "--json")
    assert "best.safetensors may be chosen by noise" in proc.stderr
    assert json.loads(proc.stdout)["best_selected_on"] == "validation"


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_which_last_on_eval_predict_export_and_plot(tmp_path, cli):
    from ncmcli.data.fakedata import make_folder

    out = tmp_path / "run"
    assert cli("train", "--preset", "quickstart", "--set", "train.epochs=2", "--set", "data.limit_train=300",
               "--set", "data.limit_test=100", "--out", out).returncode == 0
    best_epoch = json.loads((out / "result.json").read_text())["best"]["epoch"]
    ev = json.loads(cli("eval", out, "--which", "last", "--json").stdout)
    assert ev["checkpoint"].endswith("last.safetensors") and ev["epoch"] == 2
    assert json.loads(cli("eval", out, "--json").stdout)["epoch"] == best_epoch
    make_folder(tmp_path / "imgs", classes=("a",), per_class=1, size=(28, 28), mode="L")
    pred = json.loads(cli("predict", tmp_path / "imgs", "--checkpoint", out, "--which", "last", "--json").stdout)
    assert pred["checkpoint"].endswith("last.safetensors")
    proc = cli("export", out, "--which", "last", "--format", "torchscript")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("last.torchscript.pt"), proc.stderr
    proc = cli("plot", "confusion", out, "--which", "last", "--out", tmp_path / "c.png")
    assert proc.returncode == 0 and (tmp_path / "c.png").is_file(), proc.stderr
    assert_clean_error(cli("eval", out, "--which", "newest"), 2, "--which must be best or last")
