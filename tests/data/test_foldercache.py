"""The image-folder cache (decode once, safetensors, keyed to the folder's contents) and
stratified subsets, on folders the tests write themselves."""

import os
import time

import pytest
import torch
from helpers_data import make_folder

from ncmcli.config.presets import resolve
from ncmcli.data import foldercache
from ncmcli.data.datasets import load_dataset, stratified_indices


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("NCM_CACHE", str(tmp_path / "cache"))


def _cfg(root, *sets):
    return resolve("quickstart", ["data.name=folder", f"data.root={root}", "data.image_size=8", *sets]).data


def _decodes(monkeypatch):
    """Count how many files the loader decodes."""
    calls = []
    real = foldercache.load_image

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(foldercache, "load_image", counting)
    return calls


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    make_folder(tmp_path / "f", per_class=4)
    calls = _decodes(monkeypatch)
    first = load_dataset(_cfg(tmp_path / "f"))
    assert len(calls) == 2 * 3 * 4
    second = load_dataset(_cfg(tmp_path / "f"))
    assert len(calls) == 2 * 3 * 4  # nothing decoded again
    assert torch.equal(first.train.images, second.train.images) and torch.equal(
        first.test.labels, second.test.labels
    )
    assert len(list((tmp_path / "cache" / "folders").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("change", ["add", "remove", "rewrite"])
def test_a_changed_folder_is_decoded_again(tmp_path, monkeypatch, change):
    from PIL import Image

    make_folder(tmp_path / "f", per_class=4)
    before = load_dataset(_cfg(tmp_path / "f"))
    calls = _decodes(monkeypatch)
    target = tmp_path / "f" / "train" / "dog" / "1.png"
    if change == "add":
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "f" / "train" / "dog" / "9.png")
    elif change == "remove":
        target.unlink()
    else:
        Image.new("RGB", (8, 8), (0, 255, 0)).save(target)
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    after = load_dataset(_cfg(tmp_path / "f"))
    assert len(calls) == len(after.train) and len(calls) > 0  # the train split was rebuilt, test kept
    assert len(after.train) == len(before.train) + {"add": 1, "remove": -1, "rewrite": 0}[change]
    assert any("changed since it was cached" in n for n in after.notes)
    if change == "rewrite":
        idx = [i for i, lbl in enumerate(after.train.labels.tolist()) if lbl == 1][1]  # dog/1.png
        assert torch.equal(
            after.train.images[idx],
            torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8),
        )


@pytest.mark.parametrize("damage", [b"", b"\x00" * 7, b"garbage that is not a safetensors file", "truncate"])
def test_a_corrupt_cache_file_is_rebuilt_with_a_note(tmp_path, damage):
    make_folder(tmp_path / "f", per_class=2)
    good = load_dataset(_cfg(tmp_path / "f"))
    for path in (tmp_path / "cache" / "folders").glob("*train*.safetensors"):
        path.write_bytes(path.read_bytes()[:200] if damage == "truncate" else damage)
    again = load_dataset(_cfg(tmp_path / "f"))
    assert torch.equal(good.train.images, again.train.images)
    assert any("unreadable" in n and "rebuilding" in n for n in again.notes)
    third = load_dataset(_cfg(tmp_path / "f"))
    assert not any("cache" in n for n in third.notes)  # rebuilt for good


def test_the_cache_load_path_never_unpickles(tmp_path, monkeypatch):
    import pickle

    make_folder(tmp_path / "f", per_class=2)
    load_dataset(_cfg(tmp_path / "f"))

    def refuse(*a, **k):
        raise AssertionError("unpickling on the cache path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ds = load_dataset(_cfg(tmp_path / "f"))
    assert len(ds.train) == 6
    from safetensors import safe_open

    for path in (tmp_path / "cache" / "folders").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:  # a plain safetensors file
            assert set(fh.keys()) == {"images", "labels"} and fh.metadata()["format"] == foldercache.FORMAT


def test_cache_off_decodes_every_time(tmp_path, monkeypatch):
    make_folder(tmp_path / "f", per_class=2)
    load_dataset(_cfg(tmp_path / "f", "data.cache=false"))
    assert not (tmp_path / "cache").exists()


def test_limits_on_a_sorted_folder_are_stratified(tmp_path):
    # Class folders are read in sorted order, so "the first N files" would be one class only.
    make_folder(tmp_path / "f", classes=("a", "b", "c", "d"), per_class=10, size=(8, 8))
    ds = load_dataset(_cfg(tmp_path / "f", "data.limit_train=8", "data.limit_test=20"))
    assert ds.train.labels.bincount(minlength=4).tolist() == [2, 2, 2, 2]
    assert ds.test.labels.bincount(minlength=4).tolist() == [5, 5, 5, 5]
    again = load_dataset(_cfg(tmp_path / "f", "data.limit_train=8"))
    other = load_dataset(_cfg(tmp_path / "f", "data.limit_train=8", "data.subset_seed=1"))
    assert torch.equal(ds.train.images, again.train.images)  # seeded
    assert not torch.equal(ds.train.images, other.train.images)


def test_a_split_without_some_classes_is_warned_about(tmp_path):
    make_folder(tmp_path / "f", classes=("a", "b", "c", "d"), per_class=10, size=(8, 8))
    ds = load_dataset(_cfg(tmp_path / "f", "data.limit_test=2"))
    warning = [n for n in ds.notes if n.startswith("warning")]
    assert len(warning) == 1 and "test split has no images of 2 classes" in warning[0]


def test_stratified_indices_against_a_hand_count():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, seed=3)
    assert labels[idx].bincount().tolist() == [5, 3, 2] and len(set(idx.tolist())) == 10
    assert idx.tolist() == sorted(idx.tolist())
    # Rounding by largest remainder: 7 of (50, 30, 20) -> exact (3.5, 2.1, 1.4) -> (4, 2, 1).
    assert labels[stratified_indices(labels, 7)].bincount().tolist() == [4, 2, 1]


def test_augmentation_works_on_folder_data(tmp_path):
    """Pad-crop-flip and flips alone on a decoded folder: every augmented image is a shifted
    (and maybe mirrored) window of its zero-padded original."""
    from ncmcli.data.batching import batches

    make_folder(tmp_path / "f", per_class=4, size=(8, 8))
    ds = load_dataset(_cfg(tmp_path / "f"))
    for kw in ({"augment_batches": True}, {"flip_batches": True}):
        g = torch.Generator().manual_seed(0)
        seen = 0
        for x, y in batches(ds.train, 5, mean=[0.0] * 3, std=[1 / 255] * 3, device="cpu", generator=g, **kw):
            for xi, yi in zip(x, y):
                idx = (ds.train.labels == yi).nonzero().flatten()
                candidates = ds.train.images[idx].float()
                pad = 4 if kw.get("augment_batches") else 0
                padded = torch.nn.functional.pad(candidates, (pad, pad, pad, pad))
                windows = [
                    padded[:, :, oy : oy + 8, ox : ox + 8]
                    for oy in range(2 * pad + 1)
                    for ox in range(2 * pad + 1)
                ]
                assert any(
                    torch.equal(w[j], xi) or torch.equal(w[j].flip(-1), xi)
                    for w in windows
                    for j in range(len(candidates))
                )
                seen += 1
        assert seen == len(ds.train)


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    make_folder(tmp_path / "f", per_class=2, size=(8, 8))
    os.mkfifo(tmp_path / "f" / "train" / "cat" / "zz.png")
    ds = load_dataset(_cfg(tmp_path / "f"))
    assert len(ds.train) == 6 and any("not a regular file" in n for n in ds.notes)


def test_without_ncm_cache_folders_and_anchors_sit_side_by_side_under_xdg(tmp_path, monkeypatch):
    """The default cache is $XDG_CACHE_HOME/ncm, holding ``folders/`` and ``anchors/`` (anchors
    once went into ``ncm/folders/anchors``)."""
    from ncmcli.nn.anchors import make_anchors

    monkeypatch.delenv("NCM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_folder(tmp_path / "f", classes=("a", "b"), per_class=2)
    load_dataset(_cfg(tmp_path / "f"))
    make_anchors("optimized", 5, 3, seed=1)
    ncm = tmp_path / "xdg" / "ncm"
    assert sorted(p.name for p in ncm.iterdir()) == ["anchors", "folders"]
    assert len(list((ncm / "folders").glob("*.safetensors"))) == 2
    assert [p.name for p in (ncm / "anchors").iterdir()] == ["optimized-v1-c5-d3-seed1.safetensors"]
