"""Crafted checkpoints, refused in one line before anything is allocated (ncmcli/runs/validate.py and
ckfile.py; RELIABILITY.md lists the guarantees). Subprocesses run under ``capped``: a memory cap
and a timeout, so that a regression fails fast. Also: hostile JSON nesting in checkpoint
metadata, special files named on the command line, and config bounds that training and
loading must agree on."""

import json
import os

import pytest
import torch
from conftest import assert_clean_error, capped, untrained_file
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ncmcli.config import schema as config
from ncmcli.nn import floors
from ncmcli.runs import checkpoint
from ncmcli.storage import bounded_json, save_tensors


def _tamper(path, out, *, tensors=None, meta=None):
    t = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        m = dict(fh.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    save_tensors(out, t, m)  # a fresh digest: the tampering is what the reader must find
    return out


@pytest.mark.parametrize(
    "meta,fragment",
    [
        ({"input_shape": "[1, 4096, 4096]"}, "at most 1024"),
        ({"input_shape": "[1, 1024, 1024]"}, "the config implies [32, 524288]"),
        (
            {
                "input_shape": "[3, 1024, 1024]",
                "normalization": json.dumps({"mean": [0.1] * 3, "std": [0.2] * 3}),
                "config": json.dumps({"model": {"arch": "cifar100", "feature_dim": 65536}}),
            },
            "parameters, above",
        ),
        ({"classes": json.dumps([f"c{i}" for i in range(100_001)])}, "classes"),
    ],
)
def test_crafted_sizes_are_refused_before_anything_is_allocated(tmp_path, meta, fragment):
    bad = _tamper(untrained_file(tmp_path), tmp_path / "bad.safetensors", meta=meta)
    assert bad.stat().st_size < 2_000_000
    assert_clean_error(capped("eval", bad, "--device", "cpu"), 1, fragment)


def test_a_header_shape_that_the_config_does_not_imply_is_refused(tmp_path):
    path = untrained_file(tmp_path)
    bad = _tamper(path, tmp_path / "bad.safetensors", tensors={"model.fc.weight": torch.zeros(32, 7)})
    with pytest.raises(checkpoint.CheckpointError, match=r"model.fc.weight has shape \[32, 7\]"):
        checkpoint.load(bad)


def _anchors_of(path):
    return load_file(str(path))["anchors"]


@pytest.mark.parametrize(
    "damage,fragment",
    [
        (lambda a: a.index_fill_(0, torch.tensor([2]), float("nan")), "NaN or infinite"),
        (lambda a: a.index_fill_(0, torch.tensor([2]), float("inf")), "NaN or infinite"),
        (lambda a: a.index_fill_(0, torch.tensor([2]), 0.0), "norm"),
        (lambda a: a * 3, "norm"),
        (lambda a: a.index_copy_(0, torch.tensor([4]), a[3:4].clone()), "coincide"),
    ],
)
def test_broken_anchors_are_refused(tmp_path, damage, fragment):
    path = untrained_file(tmp_path)
    bad = _tamper(path, tmp_path / "bad.safetensors", tensors={"anchors": damage(_anchors_of(path).clone())})
    with pytest.raises(checkpoint.CheckpointError, match=fragment):
        checkpoint.load(bad)


def test_nan_weights_and_statistics_are_refused(tmp_path):
    path = untrained_file(tmp_path)
    w = load_file(str(path))["model.fc.weight"].clone()
    w[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="model.fc.weight holds NaN"):
        checkpoint.load(_tamper(path, tmp_path / "w.safetensors", tensors={"model.fc.weight": w}))
    with pytest.raises(checkpoint.CheckpointError, match="mean is not finite"):
        checkpoint.load(
            _tamper(
                path,
                tmp_path / "m.safetensors",
                meta={"normalization": json.dumps({"mean": [float("nan")], "std": [0.2]})},
            )
        )


def _quick_run(ncm, out, *sets):
    args = [
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=64",
        "--set",
        "data.limit_test=20",
        "--out",
        out,
        "--quiet",
    ]
    for s in sets:
        args += ["--set", s]
    proc = ncm(*args)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny trained run folder, shared by the tests that only read it."""
    from conftest import run_ncm

    return _quick_run(run_ncm, tmp_path_factory.mktemp("shared") / "run")


def _with_meta(src, dst, **update):
    with safe_open(str(src), "pt") as fh:
        meta = dict(fh.metadata())
    meta.update(update)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_bounded_json_refuses_deep_nesting_but_not_brackets_in_strings():
    assert bounded_json(json.dumps({"a": "[" * 500, "b": [[1]]})) == {"a": "[" * 500, "b": [[1]]}
    with pytest.raises(ValueError, match="nested deeper"):
        bounded_json("[" * 100_000 + "]" * 100_000)
    assert bounded_json("[" * 60 + "]" * 60) is not None


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
@pytest.mark.parametrize("key", ["config", "classes", "metrics", "train_state", "class_counts"])
def test_deep_json_in_checkpoint_metadata_is_a_one_line_error(tmp_path, ncm, key, quick_run):
    run = quick_run
    deep = "[" * 200_000 + "]" * 200_000
    bad = _with_meta(run / "last.safetensors", tmp_path / "bad.safetensors", **{key: deep})
    proc = ncm("eval", bad)
    if key == "train_state":  # eval never reads the train state; resume does
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "config.yaml").write_text((run / "config.yaml").read_text())
        os.replace(bad, tmp_path / "r" / "last.safetensors")
        proc = ncm("train", "--resume", tmp_path / "r")
    assert_clean_error(
        proc, 1, "not a valid ncm checkpoint" if key != "train_state" else "damaged train state"
    )
    assert "RecursionError" not in proc.stderr


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_special_files_named_as_arguments_return_at_once(tmp_path, ncm, quick_run):
    run = quick_run
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "p.yaml")
    os.mkfifo(tmp_path / "a.safetensors")
    cases = [
        (("predict", fifo, "--checkpoint", run / "best.safetensors"), 1, "not a regular file"),
        (("predict", run / "best.safetensors", "--checkpoint", fifo), 2, "is a FIFO"),
        (("eval", fifo), 2, "is a FIFO"),
        (("export", fifo), 2, "is a FIFO"),
        (("train", "--preset", tmp_path / "p.yaml"), 2, "is a FIFO"),
        (("anchors", "-C", "3", "-d", "3", "--method", tmp_path / "a.safetensors"), 2, "is a FIFO"),
    ]
    for args, code, fragment in cases:
        proc = ncm(*args, timeout=60)  # a blocked open would hang here until the timeout
        assert proc.returncode == code, (args, proc.stderr)
        assert fragment in proc.stderr, (args, proc.stderr)
    resume = tmp_path / "resume"
    resume.mkdir()
    os.mkfifo(resume / "config.yaml")
    (resume / "last.safetensors").write_bytes((run / "last.safetensors").read_bytes())
    assert_clean_error(ncm("train", "--resume", resume, timeout=60), 2, "not a resumable run folder")


def test_bounds_come_from_one_place():
    from ncmcli.runs import checkpoint, validate

    assert validate.MAX_FEATURE_DIM is config.MAX_FEATURE_DIM and checkpoint.MAX_PARAMS is config.MAX_PARAMS
    assert validate.MAX_SCALE is config.MAX_SCALE and floors.MAX_AUTO_SCALE == config.MAX_SCALE
    assert validate.MAX_SIDE >= 512  # data.image_size's upper bound


@pytest.mark.slow
@pytest.mark.parametrize(
    "sets",
    [
        ("model.feature_dim=65536",),
        ("loss.scale=10000", "optim.lr=1e-9"),
        ("data.imbalance=exp:10000", "loss.logit_adjust=10"),
    ],
)
def test_a_config_at_its_limit_goes_through_train_and_eval(tmp_path, ncm, sets):
    run = _quick_run(ncm, tmp_path / "run", *sets)
    for cmd in (("eval", run, "--json"), ("eval", run / "last.safetensors", "--json")):
        proc = ncm(*cmd)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["n"] == 20
    assert ncm("train", "--resume", run, "--set", "train.epochs=2", "--quiet").returncode == 0


def test_a_model_too_big_to_load_is_refused_before_training(tmp_path, cli):
    from ncmcli.data.fakedata import make_folder

    # The paper's CIFAR-100 net at d = 65536 on 32x32 RGB has 1.5 x 2^28 parameters.
    make_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=(32, 32))
    proc = cli(
        "train",
        "--preset",
        "folder",
        "--set",
        f"data.root={tmp_path / 'imgs'}",
        "--set",
        "model.arch=cifar100",
        "--set",
        "model.feature_dim=65536",
        "--set",
        "data.val_split=0",
        "--out",
        tmp_path / "run",
        "--quiet",
    )
    assert_clean_error(proc, 2, "a checkpoint may hold")
    assert not (tmp_path / "run").exists()
