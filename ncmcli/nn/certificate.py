"""An anchor set's certificate: its pairwise angles, how close its smallest angle comes to the best
known for (C, d), duplicate rows, and the loss floor at a scale (what ``ncm anchors`` prints and
checkpoint loading checks)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ncmcli.nn.floors import loss_floor, top_probability


def unit_rows(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=1, keepdim=True)


def pairwise_angles(a: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between all distinct pairs of rows, as a flat tensor."""
    an = unit_rows(a.double())
    cos = (an @ an.T).clamp(-1.0, 1.0)
    i, j = torch.triu_indices(len(a), len(a), offset=1)
    return torch.rad2deg(torch.arccos(cos[i, j]))


def duplicate_pairs(a: torch.Tensor, tol_deg: float = 1e-6) -> list[tuple[int, int]]:
    an = unit_rows(a.double())
    cos = an @ an.T
    i, j = torch.triu_indices(len(a), len(a), offset=1)
    close = cos[i, j] >= math.cos(math.radians(tol_deg))
    return [(int(p), int(q)) for p, q in zip(i[close], j[close])]


def best_known_min_angle(c: int, d: int) -> float | None:
    """The optimal min pairwise angle (degrees) where it is known in closed form."""
    if d == 1:
        return 180.0 if c == 2 else None
    if c <= d + 1:
        return math.degrees(math.acos(-1.0 / (c - 1)))  # regular simplex
    if c <= 2 * d:
        return 90.0  # orthoplex (Rankin's bound)
    if d == 2:
        return 360.0 / c
    return None


@dataclass(frozen=True)
class AnchorCertificate:
    classes: int
    dim: int
    method: str
    min_angle_deg: float
    mean_angle_deg: float
    max_angle_deg: float
    best_known_min_angle_deg: float | None
    norm_min: float
    norm_max: float
    duplicates: list = field(default_factory=list)
    metric: str = "euclidean"
    scale: float = 1.0
    loss_floor: float = 0.0
    top_probability: float = 1.0  # e^-floor: the best probability of the true class at this scale

    def to_dict(self) -> dict:
        return asdict(self)


def anchor_certificate(
    anchors: torch.Tensor, method: str, metric: str = "euclidean", scale: float = 1.0
) -> AnchorCertificate:
    """What users should know about a set of anchors before training on them."""
    ang = pairwise_angles(anchors)
    norms = anchors.double().norm(dim=1)
    c, d = anchors.shape
    floor = loss_floor(anchors, metric, scale)
    return AnchorCertificate(
        classes=c,
        dim=d,
        method=method,
        min_angle_deg=round(ang.min().item(), 6),
        mean_angle_deg=round(ang.mean().item(), 6),
        max_angle_deg=round(ang.max().item(), 6),
        best_known_min_angle_deg=best_known_min_angle(c, d),
        norm_min=norms.min().item(),
        norm_max=norms.max().item(),
        duplicates=duplicate_pairs(anchors),
        metric=metric,
        scale=scale,
        loss_floor=floor,
        top_probability=top_probability(floor),
    )
