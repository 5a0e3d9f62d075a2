import json
import os

import pytest
import torch
from conftest import save_untrained
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ncmcli.config.presets import resolve
from ncmcli.errors import CheckpointError
from ncmcli.runs import checkpoint
from ncmcli.storage import atomic_write, atomic_write_text, save_tensors


def _save(tmp_path, preset="quickstart", name="ck.safetensors"):
    return save_untrained(tmp_path / name, preset)


@pytest.mark.parametrize("preset", ["quickstart", "quickstart-softmax", "quickstart-cncm"])
def test_round_trip_gives_the_same_logits(tmp_path, preset):
    path, model, crit = _save(tmp_path, preset)
    ck = checkpoint.load(path)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(crit.logits(model(x)), ck.criterion.logits(ck.model(x)))
    assert ck.classes[3] == "c3" and ck.epoch == 3 and ck.input_shape == (1, 28, 28)
    assert ck.config == resolve(preset)


def test_plain_safetensors_reads_anchors_and_metadata(tmp_path):
    path, _, crit = _save(tmp_path)
    tensors = load_file(str(path))
    assert torch.equal(tensors["anchors"], crit.anchors) and tensors["anchors"].shape == (10, 32)
    assert all(k == "anchors" or k.startswith(("model.", "criterion.")) for k in tensors)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "ncm-checkpoint"
    assert json.loads(meta["config"])["loss"]["name"] == "encm"
    assert json.loads(meta["normalization"]) == {"mean": [0.3], "std": [0.2]}
    assert json.loads(meta["input_shape"]) == [1, 28, 28]
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp files left


def test_truncated_empty_random_and_foreign_files_are_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    blob = path.read_bytes()
    cases = {
        "truncated": blob[: len(blob) // 2],
        "empty": b"",
        "random": os.urandom(4096),
        "header-only": blob[:8],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable safetensors|cannot read tensors|corrupt"):
            checkpoint.load(p)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an ncm checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.safetensors")


def _rewrite(path, out, *, drop=None, reshape=None, meta_update=None):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata())
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    meta.update(meta_update or {})
    save_tensors(out, tensors, meta)  # a fresh digest: the rewrite is what the reader must find
    return out


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"drop": "model.fc.weight"}, "do not match the model"),
        ({"reshape": "model.fc.weight"}, "model.fc.weight has shape .3, 3., the config implies"),
        ({"reshape": "anchors"}, "anchors has shape"),
        ({"meta_update": {"config": "{not json"}}, "not valid JSON"),
        ({"meta_update": {"classes": "[]"}}, "classes"),
        ({"meta_update": {"classes": json.dumps(["a", "b"])}}, "anchors has shape"),
        ({"meta_update": {"input_shape": "[1, 99999999, 28]"}}, "input_shape"),
        ({"meta_update": {"input_shape": "[-1, 28, 28]"}}, "input_shape"),
        (
            {"meta_update": {"config": json.dumps({"model": {"feature_dim": 10**9}})}},
            "feature_dim must be in",
        ),
        ({"meta_update": {"config": json.dumps({"loss": {"name": "evil"}})}}, "invalid config"),
        ({"meta_update": {"format_version": "99"}}, "version"),
    ],
)
def test_tampered_checkpoints_are_refused(tmp_path, kwargs, fragment):
    path, _, _ = _save(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(CheckpointError, match=fragment):
        checkpoint.load(bad)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
