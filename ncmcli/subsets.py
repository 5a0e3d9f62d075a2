"""Which images a split keeps: seeded stratified samples (``data.limit_*``, ``data.val_split``)
and long-tailed profiles (``data.imbalance``)."""

from __future__ import annotations

import torch


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


def imbalanced_indices(labels: torch.Tensor, num_classes: int, kind: str, factor: float, *,
                       seed: int = 0) -> torch.Tensor:
    """The indices of a long-tailed subset of ``labels``: class c keeps a seeded random
    min(n_c, its images), n_c from ``imbalance_counts`` with n_max the largest class."""
    have = torch.bincount(labels, minlength=num_classes)
    want = imbalance_counts(int(have.max()), num_classes, kind, factor)
    g = torch.Generator().manual_seed(seed + 2)  # not the limits' or the validation split's draw
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:max(1, want[c])]])
    return torch.cat(picked).sort().values
