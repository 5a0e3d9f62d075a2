"""Crafted checkpoints, refused in one line before anything is allocated (ncmcli/runs/validate.py and
ckfile.py; RELIABILITY.md lists the guarantees). Subprocesses run under ``capped``: a memory cap
and a timeout, so that a regression fails fast."""

import json
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import assert_clean_error, capped, untrained_file
from ncmcli.runs import checkpoint


def _tamper(path, out, *, tensors=None, meta=None):
    t = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        m = dict(fh.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    save_file(t, str(out), metadata=m)
    return out


@pytest.mark.parametrize("meta,fragment", [
    ({"input_shape": "[1, 4096, 4096]"}, "at most 1024"),
    ({"input_shape": "[1, 1024, 1024]"}, "the config implies [32, 524288]"),
    ({"input_shape": "[3, 1024, 1024]", "normalization": json.dumps({"mean": [0.1] * 3, "std": [0.2] * 3}),
      "config": json.dumps({"model": {"arch": "cifar100", "feature_dim": 65536}})}, "parameters, above"),
    ({"classes": json.dumps([f"c{i}" for i in range(100_001)])}, "classes"),
])
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


@pytest.mark.parametrize("damage,fragment", [
    (lambda a: a.index_fill_(0, torch.tensor([2]), float("nan")), "NaN or infinite"),
    (lambda a: a.index_fill_(0, torch.tensor([2]), float("inf")), "NaN or infinite"),
    (lambda a: a.index_fill_(0, torch.tensor([2]), 0.0), "norm"),
    (lambda a: a * 3, "norm"),
    (lambda a: a.index_copy_(0, torch.tensor([4]), a[3:4].clone()), "coincide"),
])
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
        checkpoint.load(_tamper(path, tmp_path / "m.safetensors",
                                meta={"normalization": json.dumps({"mean": [float("nan")], "std": [0.2]})}))
