"""How discriminative the features are: compactness, separation, calibration, open-set
scores. Pure tensor maths on features a checkpoint produced; no plotting here."""

from __future__ import annotations

import torch


def class_directions(criterion) -> tuple[torch.Tensor | None, str]:
    """The class vectors to draw and measure against (``Criterion.class_vectors``), on the CPU."""
    vectors, kind = criterion.class_vectors()
    return (None, "") if vectors is None else (vectors.float().cpu(), kind)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - confidence| * share of samples."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf.double() > lo) & (conf.double() <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(
                correct[inside].mean().item() - conf[inside].double().mean().item()
            )
    return ece


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = torch.cat([scores_pos, scores_neg]).double()
    ranks = torch.empty_like(s)
    order = torch.argsort(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # Average ranks over ties.
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def fpr_at_tpr(scores_pos: torch.Tensor, scores_neg: torch.Tensor, tpr: float = 0.95) -> tuple[float, float]:
    """(FPR, threshold): accept score >= threshold, chosen so that ``tpr`` of positives pass."""
    threshold = torch.quantile(scores_pos.double(), 1 - tpr).item()
    return (scores_neg.double() >= threshold).double().mean().item(), threshold


def nearest_two(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (N, C) anchor distances: the (N,) nearest distance, and the (N,) margin by which
    the second-nearest anchor is farther (the confidence a flat scale-1 probability hides)."""
    two = distances.topk(2, dim=1, largest=False).values  # (N, 2) nearest and second-nearest
    return two[:, 0], two[:, 1] - two[:, 0]


def own_and_nearest_other(distances: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (N, C) anchor distances: each feature's (N,) distance to its own class's anchor
    (compactness) and to the nearest other anchor (separation)."""
    rows = torch.arange(len(labels))
    own = distances[rows, labels]  # (N,)
    others = distances.clone()
    others[rows, labels] = float("inf")
    return own, others.min(1).values


def anchor_report(distances: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Compactness and separation from (N, C) feature-anchor distances."""
    own, nearest_other = own_and_nearest_other(distances, labels)
    per_class = {}
    for c, name in enumerate(classes):
        m = labels == c
        if m.any():
            per_class[name] = {
                "mean": own[m].mean().item(),
                "median": own[m].median().item(),
                "n": int(m.sum()),
            }
    return {
        "compactness": {"mean": own.mean().item(), "median": own.median().item(), "per_class": per_class},
        "separation": {
            "mean_nearest_other_anchor": nearest_other.mean().item(),
            "own_voronoi_cell_share": (distances.argmin(1) == labels).double().mean().item(),
        },
    }


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(mean (d,), components (d, 2), explained variance ratios) of the features."""
    mu = features.double().mean(0)
    centred = features.double() - mu
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.pow(2)
    ratio = (var[:2] / var.sum()).tolist()
    return mu, vh[:2].T, ratio


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the ``k`` largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return (top == labels[:, None]).any(1).double().mean().item()


def per_class_scores(confusion) -> tuple[list[dict], float]:
    """Precision, recall, F1 and support per class from a (C, C) confusion matrix (rows:
    true class, columns: predicted), and the macro-F1 over the classes that have images.
    An undefined ratio (no predictions, no images) is None, not 0."""
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    tp, predicted, support = conf.diag(), conf.sum(0), conf.sum(1)
    rows, f1s = [], []
    for c in range(len(conf)):
        p = (tp[c] / predicted[c]).item() if predicted[c] > 0 else None
        r = (tp[c] / support[c]).item() if support[c] > 0 else None
        f1 = 0.0 if (p == 0 or r == 0) else (2 * p * r / (p + r) if p is not None and r is not None else None)
        rows.append({"precision": p, "recall": r, "f1": f1, "n": int(support[c])})
        if support[c] > 0:
            f1s.append(f1 or 0.0)  # a class never predicted has F1 0
    return rows, (sum(f1s) / len(f1s) if f1s else None)
