"""ncmcli/storage.py: the digest of every file of tensors (against hashlib over the bytes, and
one flipped bit refused by every reader), the temp-file discipline and its sweep, and
``ncm verify``."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import untrained_file
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from ncmcli import storage
from ncmcli.storage import CorruptFile, FileNote, read_tensor_file, save_tensors


def _sections(raw: bytes) -> tuple[dict, bytes]:
    """A naive reading of the safetensors layout: (header JSON, data bytes)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _flip_one_bit(path: Path, seed: int = 0) -> int:
    """Flip one bit at a seeded random offset in the file's tensor data; the offset."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    offset = random.Random(seed).randrange(8 + n, len(raw))
    raw[offset] ^= 1 << random.Random(seed + 1).randrange(8)
    path.write_bytes(bytes(raw))
    return offset


def test_the_digest_is_the_sha256_of_the_data_bytes_on_disk(tmp_path):
    tensors = {
        "b": torch.randn(3, 5),
        "a": torch.arange(7, dtype=torch.int64),
        "h": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_tensors(path, tensors, {"format": "x"})
    header, data = _sections(path.read_bytes())
    meta = header.pop("__metadata__")
    assert meta == {"format": "x", storage.DIGEST_KEY: "sha256:" + hashlib.sha256(data).hexdigest()}
    back = st_load(path.read_bytes())  # safetensors itself reads the file
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    f = read_tensor_file(path)
    assert f.digest == meta[storage.DIGEST_KEY] and all(
        torch.equal(f.tensors()[k], tensors[k]) for k in tensors
    )
    assert (len(path.read_bytes()) - len(data)) % 8 == 0  # the data stays 8-byte aligned


@pytest.mark.parametrize("seed", range(5))
def test_one_flipped_bit_anywhere_in_the_data_is_refused(tmp_path, seed):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.randn(64, 33), "n": torch.arange(10)})
    _flip_one_bit(path, seed)
    with pytest.raises(CorruptFile, match="corrupt"):
        read_tensor_file(path)
    assert read_tensor_file(path, verify=False).digest is not None  # the check is what refuses it


def test_a_file_without_a_digest_still_loads_with_a_note(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    with pytest.warns(FileNote, match="carries no digest"):
        f = read_tensor_file(path)
    assert f.digest is None and torch.equal(f.tensors()["w"], torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_tensor_file(path, note_undigested=False)


def test_writing_leaves_no_file_but_the_target(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_sweep_removes_only_the_temps_of_dead_writers(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    names = {
        f".best.safetensors.ncm{dead}.abcd1234.tmp": True,  # a writer killed mid-write
        f".best.safetensors.ncm{live}.abcd1234.tmp": False,  # a live writer's
        f".demo.onnx.ncm{dead}.zzzz9999.tmp": True,
        ".last.safetensors.q1w2e3r4.tmp": False,  # an older ncm's: only when the folder is locked
        ".tmpAbC123": False,  # safetensors' own, from older ncm versions: likewise
        "best.safetensors": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = {p.name for p in storage.remove_stale_temps(tmp_path, target="demo.onnx")}
    assert removed == {f".demo.onnx.ncm{dead}.zzzz9999.tmp"}
    removed = {p.name for p in storage.remove_stale_temps(tmp_path)}
    assert removed == {n for n, stale in names.items() if stale} - {f".demo.onnx.ncm{dead}.zzzz9999.tmp"}
    removed = {p.name for p in storage.remove_stale_temps(tmp_path, locked=True)}
    assert removed == {".last.safetensors.q1w2e3r4.tmp", ".tmpAbC123"}
    assert {p.name for p in tmp_path.iterdir()} == {
        f".best.safetensors.ncm{live}.abcd1234.tmp",
        "best.safetensors",
    }


def test_temp_files_carry_the_writers_pid(tmp_path):
    tmp = storage.temp_path_for(tmp_path / "x.json")
    assert (
        storage._TEMP.match(tmp.name)["pid"] == str(os.getpid())
        and storage._TEMP.match(tmp.name)["name"] == "x.json"
    )


def test_append_line_ends_every_line(tmp_path):
    path = tmp_path / "m.jsonl"
    storage.append_line(path, '{"epoch": 1}')
    storage.append_line(path, '{"epoch": 2}\n')
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


# -- every reader of every kind of file refuses a flipped bit ----------------------------


def test_a_flipped_checkpoint_is_refused_by_every_command(tmp_path, cli, quickstart_run):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    _flip_one_bit(run / "best.safetensors", seed=3)
    _flip_one_bit(run / "last.safetensors", seed=4)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    commands = [
        ("eval", run),
        ("predict", image, "--checkpoint", run / "best.safetensors"),
        ("export", run, "--format", "torchscript", "--out", tmp_path / "x.pt"),
        ("plot", "confusion", run),
        ("train", "--resume", run, "--set", "train.epochs=3"),
        ("train", "--preset", "quickstart", "--extend", run / "best.safetensors", "--set", "data.classes=0"),
    ]
    for args in commands:
        proc = cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "corrupt" in lines[-1] and "Traceback" not in proc.stderr, (
            args,
            proc.stderr,
        )
        assert "safetensors" in lines[-1]


def test_a_flipped_replay_memory_is_refused(tmp_path):
    from ncmcli.data import replay
    from ncmcli.errors import DataError

    mem = replay.Memory(
        torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"], {}
    )
    replay.save(tmp_path / "replay.safetensors", mem)
    assert torch.equal(replay.load(tmp_path / "replay.safetensors", (1, 8, 8)).labels, mem.labels)
    _flip_one_bit(tmp_path / "replay.safetensors", seed=1)
    with pytest.raises(DataError, match="corrupt"):
        replay.load(tmp_path / "replay.safetensors", (1, 8, 8))


def test_a_flipped_folder_cache_is_rebuilt_with_a_note(tmp_path, monkeypatch):
    from ncmcli.data import foldercache
    from ncmcli.data.fakedata import make_folder

    monkeypatch.setenv("NCM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    make_folder(root, classes=("a", "b"), per_class=3, size=(12, 12))
    files = sorted((root / "train").rglob("*.png"))
    labels = torch.tensor([0 if f.parent.name == "a" else 1 for f in files])
    first = foldercache.load_cached(root, "train", files, labels, 1, 8, [])
    (cache,) = (tmp_path / "cache").rglob("*.safetensors")
    _flip_one_bit(cache, seed=2)
    notes = []
    again = foldercache.load_cached(root, "train", files, labels, 1, 8, notes)
    assert torch.equal(again, first) and any("corrupt" in n and "rebuilding" in n for n in notes), notes
    assert read_tensor_file(cache).digest is not None  # rebuilt, and whole again


def test_a_flipped_anchor_cache_is_recomputed_with_a_note(tmp_path, monkeypatch):
    from ncmcli.nn import anchors

    monkeypatch.setenv("NCM_CACHE", str(tmp_path))
    first = anchors._cached_optimized(5, 3, 0)
    (cache,) = (tmp_path / "anchors").glob("*.safetensors")
    _flip_one_bit(cache, seed=5)
    with pytest.warns(FileNote, match="corrupt"):
        again = anchors._cached_optimized(5, 3, 0)
    assert torch.equal(again, first) and read_tensor_file(cache).digest is not None


# -- ncm verify ----------------------------------------------------------------------


def test_verify_says_ok_corrupt_and_no_digest_one_line_each(tmp_path, cli):
    good = untrained_file(tmp_path, name="good.safetensors")
    bad = untrained_file(tmp_path, name="bad.safetensors")
    _flip_one_bit(bad)
    old = tmp_path / "old.safetensors"
    save_file(st_load(good.read_bytes()), str(old))
    proc = cli("verify", good, old)
    assert proc.returncode == 0 and [line.split(": ")[1].split()[0] for line in proc.stdout.splitlines()] == [
        "ok",
        "no-digest",
    ]
    proc = cli("verify", good, bad, "--json")
    assert proc.returncode == 1
    assert [r["status"] for r in json.loads(proc.stdout)["results"]] == ["ok", "corrupt"]
    assert cli("verify", tmp_path / "missing").returncode == 2


def test_verify_checks_a_run_folder_whole(tmp_path, cli, quickstart_run):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    proc = cli("verify", run)
    assert proc.returncode == 0 and ": ok (checked best.safetensors, last.safetensors" in proc.stdout
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "tra')  # a torn line
    proc = cli("verify", run)
    assert proc.returncode == 1 and "unreadable" in proc.stdout and "metrics.jsonl" in proc.stdout
    _flip_one_bit(run / "last.safetensors")
    proc = cli("verify", run)
    assert proc.returncode == 1 and ": corrupt (last.safetensors" in proc.stdout


def test_a_checkpoint_without_a_digest_loads_with_a_one_line_note(tmp_path, cli):
    from ncmcli.data.sources import FASHION_CLASSES

    new = untrained_file(tmp_path, classes=list(FASHION_CLASSES))
    f = read_tensor_file(new)
    old = tmp_path / "old.safetensors"
    meta = {k: v for k, v in f.meta.items() if k != storage.DIGEST_KEY}
    save_file(f.tensors(), str(old), metadata=meta)  # as ncm 0.3 wrote it
    proc = cli("eval", old, "--limit", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "carries no digest" in line]
    assert len(notes) == 1 and str(old) in notes[0] and json.loads(proc.stdout)["n"] == 50
