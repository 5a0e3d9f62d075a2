"""Distances M(f, a) between features and anchors, injected into the NCM loss.

Each distance maps (B, D) features and (C, D) anchors to a (B, C) matrix. The loss never
branches on which one it holds, so E-NCM and C-NCM are the same loss with a different
strategy here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Inside the sqrt, eps keeps both the value and the gradient finite when a feature sits
# exactly on an anchor (d/dx sqrt(x) is infinite at 0). torch.cdist's backward returns
# NaN there on some builds, so the distance is expanded by hand. 1e-12 moves a distance of
# 1 by 5e-13: far below float32 resolution, and below the float64 test tolerance.
_EPS = 1e-12


def squared_euclidean(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """||f - a||^2 for every pair, via ||f||^2 - 2 f.a + ||a||^2."""
    f2 = features.pow(2).sum(1, keepdim=True)  # (B, 1)
    a2 = anchors.pow(2).sum(1)  # (C,)
    cross = features @ anchors.T  # (B, C)
    # The expansion can dip a rounding error below zero for coincident points.
    return (f2 - 2.0 * cross + a2).clamp_min(0.0)  # (B, C)


def euclidean(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The paper's E-NCM distance ||f - a||, not squared."""
    return torch.sqrt(squared_euclidean(features, anchors) + _EPS)  # (B, C)


def cosine(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The paper's C-NCM distance 1 - cos(f, a). A zero feature has distance 1 to all."""
    # normalize divides by max(||x||, eps), so a zero feature stays finite both ways.
    fn = F.normalize(features, dim=1, eps=1e-12)  # (B, D)
    an = F.normalize(anchors, dim=1, eps=1e-12)  # (C, D)
    return 1.0 - fn @ an.T  # (B, C)


DISTANCES = {
    "euclidean": euclidean,
    "cosine": cosine,
    "sqeuclidean": squared_euclidean,
}


def get_distance(metric: str):
    try:
        return DISTANCES[metric]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(DISTANCES)}") from None
