"""Datasets: MNIST, Fashion-MNIST, CIFAR-10/100, image folders and the embedded quickstart
subset, each split loaded once as an (N, C, H, W) uint8 tensor (``batching.Split``), or, for
image folders too large for memory, as a list of files (``batching.FileSplit``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ncmcli.data.sources import DATASET_BUILDERS, Dataset
from ncmcli.data.subsets import (  # noqa: F401 (re-exported)
    choose_classes,  # noqa: F401 (keep_classes re-exported)
    imbalanced_indices,
    parse_imbalance,
    stratified_indices,
)
from ncmcli.errors import DataError


def default_root() -> Path:
    """$NCM_DATA, else $XDG_CACHE_HOME/ncm/data, else ~/.cache/ncm/data."""
    if os.environ.get("NCM_DATA"):
        return Path(os.environ["NCM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ncm" / "data"


def load_dataset(
    data_cfg,
    *,
    train: bool = True,
    say=None,
    known_classes: list[str] | None = None,
    class_order: list[str] | None = None,
) -> Dataset:
    """Both splits of ``data_cfg.name`` (``train=False`` skips the training split). ``say``
    (a message callback) hears of long waits, such as a folder's first decode, before them.

    Classes: ``data.classes``, or with ``class_order`` exactly these names in this order (a
    checkpoint's classes), or with ``known_classes`` (an ``--extend`` run) those first and the
    ``data.classes`` after them, the training split holding only the new ones."""

    root = Path(data_cfg.root).expanduser() if data_cfg.root else default_root()
    build = DATASET_BUILDERS.get(data_cfg.name)
    if build is None:  # the config schema already refuses other names
        raise DataError(f"unknown dataset {data_cfg.name!r}")
    ds = build(data_cfg, root, train, say)
    notes = list(ds.notes)
    if data_cfg.classes or known_classes is not None or class_order is not None:
        ds = choose_classes(ds, data_cfg, known_classes, class_order)
        shown = ds.classes[len(known_classes or []) :]
        how = (
            f"{len(known_classes)} from the checkpoint + {len(shown)} new"
            if known_classes
            else f"{len(shown)} kept"
        )
        notes.append(
            f"classes: {how} (data.classes): {', '.join(shown[:10])}" + (", ..." if len(shown) > 10 else "")
        )
    splits = {}
    for split_name, split, limit in (
        ("train", ds.train, data_cfg.limit_train),
        ("test", ds.test, data_cfg.limit_test),
    ):
        if split is None:
            splits[split_name] = None
            continue
        if limit and limit < len(split):
            split = split.subset(stratified_indices(split.labels, limit, seed=data_cfg.subset_seed))
            notes.append(
                f"{split_name}: a stratified sample of {len(split)} images (data.subset_seed={data_cfg.subset_seed})"
            )
        first = (
            len(known_classes) if known_classes is not None and split_name == "train" else 0
        )  # new ones only
        missing = sorted(set(range(first, len(ds.classes))) - set(split.labels.unique().tolist()))
        if missing:
            names = ", ".join(ds.classes[i] for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            notes.append(
                f"warning: the {split_name} split has no images of {len(missing)} "
                f"class{'es' if len(missing) > 1 else ''}: {names}"
            )
        splits[split_name] = split
    val = None
    if splits["train"] is not None and data_cfg.imbalance:
        splits["train"] = _long_tail(splits["train"], len(ds.classes), data_cfg, notes)
    if splits["train"] is not None and data_cfg.val_split:
        splits["train"], val = _hold_out(splits["train"], data_cfg, notes)
    return Dataset(ds.name, splits["train"], splits["test"], ds.classes, notes, val, data_cfg.imbalance)


def _long_tail(train, num_classes: int, data_cfg, notes: list[str]):
    """The ``data.imbalance`` profile applied to the training split."""
    kind, factor = parse_imbalance(data_cfg.imbalance)
    keep = imbalanced_indices(train.labels, num_classes, kind, factor, seed=data_cfg.subset_seed)
    train = train.subset(keep)
    counts = torch.bincount(train.labels, minlength=num_classes).tolist()
    notes.append(
        f"train: long-tailed ({data_cfg.imbalance}, data.subset_seed={data_cfg.subset_seed}), "
        f"{len(keep)} images; per class: {', '.join(map(str, counts))}"
    )
    return train


def _hold_out(train, data_cfg, notes: list[str]):
    """(train, validation): ``data.val_split`` images held out of train, stratified, seeded."""
    n_val = int(data_cfg.val_split) if data_cfg.val_split >= 1 else round(data_cfg.val_split * len(train))
    if not 1 <= n_val < len(train):
        raise DataError(
            f"data.val_split={data_cfg.val_split:g} leaves {n_val} of {len(train)} "
            "training images for validation; it needs at least 1 and must leave some to train on"
        )
    val_idx = stratified_indices(train.labels, n_val, seed=data_cfg.subset_seed + 1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    val = train.subset(val_idx)
    notes.append(
        f"validation: {len(val)} images held out of train (stratified); best.safetensors is "
        "selected on them" + (" (when there are at least 50)" if len(val) < 50 else "")
    )
    return train.subset(keep.nonzero().flatten()), val
