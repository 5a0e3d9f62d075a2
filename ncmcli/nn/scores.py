"""What ``ncm eval`` measures beyond accuracy: long-tail metrics (balanced accuracy,
head/medium/tail thirds, many/medium/few), post-hoc logit adjustment, and the open-set
scores that rank test images as known or unknown."""

from __future__ import annotations

import torch

from ncmcli.nn.metrics import nearest_two

# The many/medium/few convention of long-tail papers (Liu et al. 2019, "OLTR"): more than
# 100 training images, 20 to 100, fewer than 20.
MANY_ABOVE, FEW_BELOW = 100, 20


def _group_accuracy(confusion: torch.Tensor, members: list[int]) -> float | None:
    """Accuracy over the test images of ``members`` (None when they have none)."""
    if not members:
        return None
    rows = confusion[members]
    total = int(rows.sum())
    return None if total == 0 else int(rows[torch.arange(len(members)), members].sum()) / total


def imbalance_metrics(confusion, train_counts: list[int] | None) -> dict:
    """Balanced accuracy (the mean per-class recall over classes with test images) and, when
    the training counts are known, the accuracy of the head, medium and tail thirds (classes
    ranked by training count, most first, ties by label; C = 10 splits 4/3/3) and of the
    many/medium/few groups (> 100, 20..100, < 20 training images). Equal counts have no head
    or tail: only the balanced accuracy is returned then."""
    conf = torch.as_tensor(confusion, dtype=torch.int64)
    totals = conf.sum(1)
    recalls = [int(conf[c, c]) / int(totals[c]) for c in range(len(conf)) if totals[c] > 0]
    out: dict = {"balanced_accuracy": sum(recalls) / len(recalls) if recalls else None}
    if train_counts is None or len(set(train_counts)) == 1:  # balanced: no head or tail to speak of
        return out
    c = len(train_counts)
    order = sorted(range(c), key=lambda i: (-train_counts[i], i))
    sizes = [c // 3 + (1 if i < c % 3 else 0) for i in range(3)]
    thirds = [order[: sizes[0]], order[sizes[0] : sizes[0] + sizes[1]], order[sizes[0] + sizes[1] :]]
    out["head_accuracy"], out["medium_accuracy"], out["tail_accuracy"] = (
        _group_accuracy(conf, g) for g in thirds
    )
    out["thirds"] = {"head": thirds[0], "medium": thirds[1], "tail": thirds[2]}
    many = [i for i in range(c) if train_counts[i] > MANY_ABOVE]
    few = [i for i in range(c) if train_counts[i] < FEW_BELOW]
    medium = [i for i in range(c) if FEW_BELOW <= train_counts[i] <= MANY_ABOVE]
    out["many_shot_accuracy"], out["medium_shot_accuracy"], out["few_shot_accuracy"] = (
        _group_accuracy(conf, g) for g in (many, medium, few)
    )
    out["shot_groups"] = {"many": len(many), "medium": len(medium), "few": len(few)}
    return out


def adjusted_logits(logits: torch.Tensor, train_counts: list[int], tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): logits - tau * log(prior), the
    prior the training class frequencies. Its argmax favours rare classes; for an NCM model
    it is no longer the plain nearest anchor."""
    prior = torch.tensor(train_counts, dtype=torch.float64)
    if not bool((prior > 0).all()):
        raise ValueError("logit adjustment needs at least one training image of every class")
    return (logits.double() - tau * torch.log(prior / prior.sum())).to(logits.dtype)


def confusion_of(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(
        num_classes, num_classes
    )


# -- Open-set scores: higher = more likely known. Each takes (logits, distances or None).
def _margin(logits, dist):
    return nearest_two(dist)[1]


def _cac(logits, dist):
    # Miller et al. (CAC, 2021): d_min * (1 - softmin(d)_min) is low for knowns; negated.
    d_min = dist.min(1).values
    return -(d_min * (1 - torch.softmax(-dist, 1).max(1).values))


OOD_SCORES = {
    "dist": ("negative distance to the nearest anchor", True, lambda logits, dist: -dist.min(1).values),
    "margin": ("second-nearest minus nearest anchor distance", True, _margin),
    "cac": ("CAC: -(d_min (1 - softmin(d)))", True, _cac),
    "msp": (
        "maximum softmax probability",
        False,
        lambda logits, dist: torch.softmax(logits.float(), 1).max(1).values,
    ),
    "maxlogit": ("maximum logit", False, lambda logits, dist: logits.max(1).values),
}
# Measured on two real pairs (REPRODUCTION.md, "Open-set scores"): msp ranks best on 3 of the 4
# E-NCM models (Fashion-MNIST vs grayscale CIFAR-10: 0.966; CIFAR-10 6 known / 4 unknown: 0.58-0.61),
# margin is a close second, and distance inverts on both (AUROC 0.32-0.72).
DEFAULT_OOD_SCORE = "msp"


def ood_scores(logits: torch.Tensor, dist: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every open-set score that applies (anchor scores need distances)."""
    return {
        name: fn(logits, dist)
        for name, (_, needs_dist, fn) in OOD_SCORES.items()
        if dist is not None or not needs_dist
    }
