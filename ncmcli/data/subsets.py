"""Which images a split keeps: seeded stratified samples (``data.limit_*``, ``data.val_split``),
long-tailed profiles (``data.imbalance``) and class selections (``data.classes``, --extend)."""

from __future__ import annotations

import dataclasses

import torch

from ncmcli.errors import ConfigError
from ncmcli.registry import suggest


def stratified_indices(labels: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` indices drawn without replacement that keep each class's share of ``labels``
    (largest remainders for the rounding), seeded, in the split's original order."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    short = n - int(take.sum())
    if short > 0:  # the largest remainders get one more (ties: the smaller class index)
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]).item(), i))
        for i in order[:short]:
            take[i] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values


def parse_imbalance(text: str) -> tuple[str, float]:
    """'exp:100' -> ('exp', 100.0); the config check refuses anything else."""
    kind, _, factor = text.partition(":")
    return kind, float(factor)


def imbalance_counts(n_max: int, num_classes: int, kind: str, factor: float) -> list[int]:
    """Training images per class of a long-tailed profile, largest first, in label order.

    ``exp``: n_c = int(n_max * (1/IF)^(c/(C-1))), Cao et al.'s (LDAM, 2019) profile as their
    released code computes it (CIFAR-10 at IF 100: 5000, 2997, ..., 83, 50). ``step``: n_max
    for the first C//2 classes, int(n_max / IF) for the rest."""
    if kind == "exp":
        return [int(n_max * (1.0 / factor) ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    return [n_max if c < num_classes // 2 else int(n_max / factor) for c in range(num_classes)]


def imbalanced_indices(
    labels: torch.Tensor, num_classes: int, kind: str, factor: float, *, seed: int = 0
) -> torch.Tensor:
    """The indices of a long-tailed subset of ``labels``: class c keeps a seeded random
    min(n_c, its images), n_c from ``imbalance_counts`` with n_max the largest class."""
    have = torch.bincount(labels, minlength=num_classes)
    want = imbalance_counts(int(have.max()), num_classes, kind, factor)
    g = torch.Generator().manual_seed(seed + 2)  # not the limits' or the validation split's draw
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[: max(1, want[c])]])
    return torch.cat(picked).sort().values


def class_indices(ds, spec: str) -> list[int]:
    """The classes ``spec`` names (comma-separated names or indices), as indices of ``ds``, in
    the order given; an unknown one is a one-line error that lists the valid ones."""

    wanted: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in ds.classes:
            index = ds.classes.index(part)
        elif part.isdigit() and int(part) < len(ds.classes):
            index = int(part)
        else:
            shown = ", ".join(ds.classes[:20]) + (", ..." if len(ds.classes) > 20 else "")
            raise ConfigError(
                f"data.classes: {part[:40]!r} is not a class of {ds.name} (indices 0..{len(ds.classes) - 1}"
                f" or one of: {shown})" + suggest(part, ds.classes)
            )
        if index not in wanted:
            wanted.append(index)
    return wanted


def keep_classes(ds, spec: str):
    """``ds`` with only the classes ``spec`` names (comma-separated names or indices), in
    their original label order, relabelled 0..k-1; every split is filtered alike."""

    keep = sorted(class_indices(ds, spec))
    if len(keep) < 2:
        raise ConfigError(f"data.classes must name at least 2 classes, got {spec[:60]!r}")
    return reorder_classes(ds, keep)


def reorder_classes(ds, order: list[int], *, train_from: int = 0):
    """``ds`` with the classes ``order`` lists, relabelled 0..k-1 in that order. The training
    split keeps only the classes from position ``train_from`` on (an ``--extend`` run trains
    its new classes; its test split holds every class the model knows)."""
    remap = torch.full((len(ds.classes),), -1, dtype=torch.int64)
    remap[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))

    def filt(split, first: int = 0):
        if split is None:
            return None
        idx = (remap[split.labels] >= first).nonzero().flatten()
        part = split.subset(idx)
        part.labels = remap[part.labels]
        return part

    return dataclasses.replace(
        ds,
        train=filt(ds.train, train_from),
        test=filt(ds.test),
        classes=[ds.classes[i] for i in order],
        notes=list(ds.notes),
    )


def choose_classes(ds, data_cfg, known: list[str] | None, order: list[str] | None):
    """The classes ``data.load_dataset`` keeps (a ``data.Dataset`` in, one out): ``data.classes``;
    or ``order``, these names in this order; or ``known`` first, then ``data.classes``, the
    training split holding only the new ones (an --extend run)."""

    if order is None and known is None:
        return keep_classes(ds, data_cfg.classes) if data_cfg.classes else ds
    names = list(order if order is not None else known)
    missing = [n for n in names if n not in ds.classes]
    if missing:
        raise ConfigError(
            f"the checkpoint's class {missing[0][:40]!r} is not a class of {ds.name} "
            f"(it has {', '.join(ds.classes[:10])}{', ...' if len(ds.classes) > 10 else ''})"
        )
    indices = [ds.classes.index(n) for n in names]
    if order is not None:
        return reorder_classes(ds, indices)
    if not data_cfg.classes:
        raise ConfigError("--extend needs data.classes: the classes to add (e.g. --set data.classes=2,3)")
    new = class_indices(ds, data_cfg.classes)
    again = [ds.classes[i] for i in new if i in indices]
    if again:
        raise ConfigError(
            f"data.classes: {again[0][:40]!r} is already a class of the checkpoint; "
            "--extend adds new classes only"
        )
    return reorder_classes(ds, indices + new, train_from=len(indices))
