"""The tool as a user drives it: real subprocesses, real files."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error

SHORT = ["--set", "train.epochs=1", "--set", "data.limit_train=600", "--set", "data.limit_test=200"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from conftest import run_ncm

    out = tmp_path_factory.mktemp("runs") / "short"
    proc = run_ncm("train", "--preset", "quickstart", *SHORT, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), proc


@pytest.mark.slow
def test_train_writes_the_run_folder(short_run):
    out, result, proc = short_run
    assert {p.name for p in out.iterdir()} - {".ncm.lock"} == {
        "config.yaml",
        "metrics.jsonl",
        "best.safetensors",
        "last.safetensors",
        "result.json",
    }
    assert json.loads((out / "result.json").read_text()) == result
    assert result["checkpoint"] == str(out / "best.safetensors") and result["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "loss floor" in proc.stderr and "1.1594" in proc.stderr  # the certificate at start


@pytest.mark.slow
def test_eval_reproduces_the_training_accuracy(ncm, short_run):
    out, result, _ = short_run
    proc = ncm("eval", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["accuracy"] == pytest.approx(result["best"]["test_acc"], abs=1e-9)
    assert doc["n"] == 200 and len(doc["confusion"]) == 10 and sum(map(sum, doc["confusion"])) == 200
    assert set(doc["per_class_accuracy"]) == set(doc["classes"])
    text = ncm("eval", out / "best.safetensors")
    assert text.returncode == 0 and "accuracy" in text.stdout


def _write_pngs(folder: Path, n: int):
    from PIL import Image

    from ncmcli.config.schema import DataConfig
    from ncmcli.data.datasets import load_dataset

    ds = load_dataset(DataConfig(name="quickstart"), train=False)
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        Image.fromarray(ds.test.images[i, 0].numpy()).save(folder / f"{i:04d}.png")
        labels.append(ds.classes[int(ds.test.labels[i])])
    return labels


@pytest.mark.slow
def test_predict_files_folders_and_bad_files(ncm, short_run, tmp_path):
    out, _, _ = short_run
    _write_pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "bad.png").write_text("not an image")
    from PIL import Image

    Image.new("RGB", (64, 40), (200, 10, 10)).save(tmp_path / "big.jpg")
    proc = ncm(
        "predict", tmp_path / "imgs", tmp_path / "big.jpg", "--checkpoint", out, "--json", "--top-k", "2"
    )
    assert proc.returncode == 1  # one file failed, the rest went on
    doc = json.loads(proc.stdout)
    preds = doc["predictions"]
    assert len(preds) == 7 and doc["failed"] == 1
    bad = [p for p in preds if "error" in p]
    assert bad[0]["path"].endswith("bad.png") and "bad.png" in proc.stderr
    good = [p for p in preds if "error" not in p]
    assert all(len(p["top"]) == 2 and p["nearest_anchor_distance"] >= 0 for p in good)
    assert "resized" in proc.stderr  # the RGB 64x40 image was converted and resized


@pytest.mark.slow
def test_predict_finds_the_newest_checkpoint(ncm, short_run, tmp_path):
    out, _, _ = short_run
    _write_pngs(tmp_path / "imgs", 1)
    proc = ncm(
        "predict", tmp_path / "imgs" / "0000.png", env={"NCM_CHECKPOINT": str(out / "best.safetensors")}
    )
    assert proc.returncode == 0, proc.stderr
    assert "$NCM_CHECKPOINT" in proc.stderr and proc.stdout.startswith(str(tmp_path / "imgs" / "0000.png"))
    none = ncm("predict", tmp_path / "imgs" / "0000.png", cwd=tmp_path)
    assert_clean_error(none, 2, "no checkpoint")


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["train", "--preset", "nope"], 2, "unknown preset 'nope'"),
        (["train", "--preset", "quickstart", "--set", "optim.lrr=1"], 2, "did you mean 'optim.lr'"),
        (["train", "--preset", "quickstart", "--set", "train.epochs=zero"], 2, "expected int"),
        (
            [
                "train",
                "--preset",
                "mnist-encm",
                "--set",
                "data.root=/nonexistent/x",
                "--set",
                "data.download=false",
            ],
            1,
            "mnist not found in /nonexistent/x/MNIST/raw",
        ),
        (
            ["train", "--preset", "quickstart", "--out", "/proc/forbidden/run"],
            2,
            "cannot create output folder",
        ),
        (["eval", "/nonexistent.safetensors"], 2, "checkpoint not found"),
        (["predict", "/nonexistent.png", "--checkpoint", "/nonexistent.safetensors"], 2, "not found"),
    ],
)
def test_bad_input_gives_one_line_and_the_right_code(ncm, args, code, fragment, tmp_path):
    proc = ncm(*args, cwd=tmp_path)
    assert_clean_error(proc, code, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_corrupt_checkpoint_is_a_runtime_error(ncm, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert_clean_error(ncm("eval", bad), 1, "not a readable safetensors file")


@pytest.mark.slow
def test_existing_run_folder_is_refused_without_force(ncm, short_run):
    out, _, _ = short_run
    before = (out / "best.safetensors").read_bytes()
    assert_clean_error(ncm("train", "--preset", "quickstart", "--out", out), 2, "--force")
    assert (out / "best.safetensors").read_bytes() == before


@pytest.mark.slow
def test_quickstart_reaches_80_percent_and_predicts_pngs(ncm, tmp_path):
    """The README's first command, checked: >= 80% on the embedded test split."""
    proc = ncm("train", "--preset", "quickstart", "--runs", tmp_path / "runs", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["test_acc"] >= 0.80  # no test asserts a time: BENCHMARKS.md holds timings
    ev = json.loads(ncm("eval", result["run_dir"], "--json").stdout)
    assert ev["accuracy"] == pytest.approx(result["best"]["test_acc"], abs=1e-9) and ev["n"] == 1000
    labels = _write_pngs(tmp_path / "pngs", 200)
    pred = ncm("predict", tmp_path / "pngs", "--json", cwd=tmp_path)  # newest under ./runs
    assert pred.returncode == 0, pred.stderr
    got = [p["label"] for p in json.loads(pred.stdout)["predictions"]]
    assert np.mean([g == t for g, t in zip(got, labels)]) >= 0.80
