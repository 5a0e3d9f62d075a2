"""The loss floor: the lowest mean NCM loss that any features can reach for given anchors.

The plateau rule measures progress on the training loss's excess over it, the anchor
certificate prints it, and ``ncm plot curves`` draws it dashed.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ncmcli.nn.distances import get_distance

_CACHE: dict[tuple, float] = {}  # (anchor digest, shape, metric, scale) -> floor; a run asks twice
_CACHE_SIZE = 32


def loss_floor(anchors: torch.Tensor, metric: str, scale: float = 1.0) -> float:
    """The lowest mean NCM loss any features can reach, classes balanced (the plateau rule's
    reference). With unit anchors and scale 1 the softmax over -M is nearly flat, so this is
    well above 0: E-NCM with 10 orthonormal anchors cannot go below log(1 + 9 e^-sqrt(2)) =
    1.159 nats.

    - ``euclidean``: every feature on its own anchor. Exact: by the triangle inequality the
      gap ||f - a_j|| - ||f - a_c|| is at most ||a_c - a_j||, and f = a_c reaches it for
      every j at once.
    - ``cosine``: *not* on the anchor. Tilting a feature away from the other anchors widens
      every gap (for orthonormal anchors the best gap is sqrt(C/(C-1)), not 1). Equiangular
      anchors (orthonormal, regular simplex) have a closed form (``_equiangular_floor``);
      others are solved as a convex problem (``_cosine_floor``).
    - ``sqeuclidean``: 0. The gap 2 f.(a_c - a_j) grows without bound along f = t a_c.

    Results are cached per anchors, metric and scale (training asks once for the plateau
    rule and once for result.json)."""

    get_distance(metric)  # validates the name first
    a = anchors.detach().double().cpu().contiguous()
    key = (
        hashlib.blake2b(a.numpy().tobytes(), digest_size=16).hexdigest(),
        tuple(a.shape),
        metric,
        float(scale),
    )
    if key in _CACHE:
        return _CACHE[key]
    if metric == "sqeuclidean":
        value = 0.0
    elif metric == "cosine":
        value = _equiangular_floor(a, scale)
        if value is None:
            value = _cosine_floor(a, scale)
    else:
        value = _on_anchor_loss(a, metric, scale)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value
    return value


def _common_cosine(anchors: torch.Tensor, tol: float = 1e-6) -> float | None:
    """The cosine rho that every pair of (normalised) anchors shares, to within ``tol``
    (orthonormal: 0; regular simplex: -1/(C-1)), or None when the anchors are not equiangular."""
    a = torch.nn.functional.normalize(anchors, dim=1)
    c = len(a)
    if c < 2:
        return None
    rho = None
    for start in range(0, c, 1024):  # the Gram matrix a row block at a time: C can be 10,000
        g = a[start : start + 1024] @ a.T
        off_diagonal = torch.ones_like(g, dtype=torch.bool)
        off_diagonal[torch.arange(len(g)), torch.arange(start, start + len(g))] = False
        off = g[off_diagonal]
        if rho is None:
            rho = off[0].item()
        if off.numel() and (off - rho).abs().max().item() > tol:
            return None
    return rho


def _equiangular_gap(anchors: torch.Tensor, metric: str) -> float | None:
    """For equiangular anchors, the logit gap g per unit of scale at the optimum, so that the
    floor is log(1 + (C - 1) exp(-s g)); None for other anchors.

    - ``euclidean``: the distance between two anchors, sqrt(2 (1 - rho)) for unit rows.
      (less the distance of a feature on its anchor, sqrt(eps), as the distance computes them).
    - ``cosine``: sqrt(C (1 - rho) / (C - 1)) (proof in ``_equiangular_floor``).
    - ``sqeuclidean``: the squared distance 2 (1 - rho): the loss of features on their
      anchors, since its true floor is 0 at every scale (see ``scale_for_floor``)."""
    rho = _common_cosine(anchors)
    if rho is None:
        return None
    c = len(anchors)
    norms = anchors.double().norm(dim=1)
    if metric != "cosine" and not bool(((norms - 1).abs() < 1e-6).all()):
        return None  # Euclidean gaps of unequal rows: left to the general formula
    if metric == "cosine":
        return math.sqrt(max(c * (1.0 - rho) / (c - 1), 0.0))
    # d(a_c, a_j) - d(a_c, a_c) through the distance itself, so that the eps inside the
    # Euclidean sqrt is accounted for exactly: the pair's distance is sqrt(2 (1 - rho) + eps).

    a = anchors[:2].double()
    d = get_distance(metric)(a[:1], a)  # (1, 2)
    return float(d[0, 1] - d[0, 0])


def _equiangular_floor(anchors: torch.Tensor, scale: float, tol: float = 1e-6) -> float | None:
    """The cosine floor in closed form when every pair of anchors has the same cosine rho
    (orthonormal: 0; regular simplex: -1/(C-1)) to within ``tol`` (float32 anchors are off by
    about 3e-8, which moves the floor by about as much); None otherwise.

    Any permutation of the other classes is an isometry of such anchors that fixes a_c, and
    each class's loss is convex over the unit ball, so averaging a minimiser over those
    permutations gives one whose cosines to the other anchors are all equal, with the same
    loss. On that set the gap is u.(a_c - m), m the mean of the other anchors, and a_c - m
    lies in it, so the best gap is ||a_c - m|| = sqrt(C (1 - rho) / (C - 1)) and the floor
    log(1 + (C - 1) exp(-s gap))."""
    if _common_cosine(anchors, tol) is None:
        return None
    gap = _equiangular_gap(anchors, "cosine")
    return math.log1p((len(anchors) - 1) * math.exp(-scale * gap))


def _on_anchor_loss(anchors: torch.Tensor, metric: str, scale: float) -> float:
    """The mean loss with every feature on its own anchor (E-NCM's exact floor)."""

    a = anchors.detach().double().cpu()
    logits = -scale * get_distance(metric)(a, a)  # (C, C): feature c sits on anchor c
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(a))).item()


def slot_floor(slot_anchors: torch.Tensor, class_slots: torch.Tensor, metric: str, scale: float) -> float:
    """The floor of the classes in ``class_slots`` when every slot of ``slot_anchors`` stays in
    the softmax's denominator (``loss.free_slots=softmax``). E-NCM: exact, each used class's
    feature on its anchor. C-NCM: the floor of the whole slot set, exact for equiangular slots
    (every class then has the same floor) and the all-slots mean otherwise."""

    if metric == "cosine":
        return loss_floor(slot_anchors, metric, scale)
    if metric == "sqeuclidean":
        return 0.0
    a = slot_anchors.detach().double().cpu()
    rows = class_slots.detach().cpu().long()
    logits = -scale * get_distance(metric)(a[rows], a)  # (C, S): feature c on anchor slot c
    return torch.nn.functional.cross_entropy(logits, rows).item()


MAX_AUTO_SCALE = 1e4  # = config.MAX_SCALE (a test checks): a target no scale below it reaches is refused


def scale_for_floor(anchors: torch.Tensor, metric: str, target: float) -> float:
    """The scale s at which the loss floor equals ``target`` nats (``loss.scale: auto``).

    The floor falls monotonically from log C at s = 0 towards 0, so one s fits each target in
    (0, log C). Equiangular anchors (orthonormal, simplex) have it in closed form, inverting
    log(1 + (C - 1) exp(-s g)) = target: s = log((C - 1) / (e^target - 1)) / g. Others are
    bisected on ``loss_floor`` to a relative 1e-12. sq-NCM's floor is 0 at every scale, so for
    it the target is the loss of features sitting on their anchors."""

    get_distance(metric)
    a = anchors.detach().double().cpu()
    c = len(a)
    if c < 2:
        raise ValueError("auto needs at least 2 anchors")
    if not 0 < target < math.log(c):
        raise ValueError(f"floor_target {target:g} must be in (0, log C = {math.log(c):.4f}) for {c} classes")
    gap = _equiangular_gap(a, metric)
    if gap is not None and gap > 0:
        s = math.log((c - 1) / math.expm1(target)) / gap
        if s <= MAX_AUTO_SCALE:
            return s
        raise ValueError(f"floor_target {target:g} needs scale {s:.4g}, above {MAX_AUTO_SCALE:g}")

    def floor(s: float) -> float:
        return _on_anchor_loss(a, metric, s) if metric == "sqeuclidean" else loss_floor(a, metric, s)

    lo, hi = 0.0, 1.0
    while floor(hi) > target:
        lo, hi = hi, hi * 2.0
        if hi > MAX_AUTO_SCALE:
            raise ValueError(
                f"no scale up to {MAX_AUTO_SCALE:g} brings the floor down to {target:g} nats "
                "(anchors too close together?)"
            )
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if floor(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def top_probability(floor: float) -> float:
    """The highest probability of the true class the floor allows, e^-floor (exact for
    equiangular anchors; for others the geometric mean over classes)."""
    return math.exp(-floor)


def _cosine_floor(anchors: torch.Tensor, scale: float, iters: int = 5000, tol: float = 1e-13) -> float:
    """min over unit u_c of the mean over c of logsumexp(s A u_c) - s a_c.u_c (A: unit anchors).

    Each class's loss is convex in u, so its minimum over the unit *ball* is a convex problem;
    that minimum lies on the sphere (scaling up a u whose gaps are all positive, e.g. u = a_c,
    lowers the loss, and an interior stationary point would make a_c a strict convex
    combination of other unit vectors). Only the span of the anchors matters, so u lives in
    r = rank coordinates. Solved by accelerated projected gradient (FISTA) from u_c = a_c,
    step 1/L with L = s^2 ||A||^2 (the Hessian of logsumexp is below the identity)."""
    a = torch.nn.functional.normalize(anchors, dim=1)
    c = len(a)
    if c < 2 or scale == 0:
        return math.log(c) if c else 0.0
    q, _ = torch.linalg.qr(a.T)  # (d, r): an orthonormal basis of the anchors' span
    b = a @ q  # (C, r): the anchors in that basis; rows stay unit
    labels = torch.arange(c)
    lipschitz = scale**2 * torch.linalg.matrix_norm(b, ord=2).item() ** 2
    step = 1.0 / lipschitz

    def losses(u):
        return torch.logsumexp(scale * u @ b.T, 1) - scale * (u * b).sum(1)

    def project(u):
        return u / u.norm(dim=1, keepdim=True).clamp_min(1.0)

    # A work budget: about 2e10 multiply-adds (seconds), at least 20 steps. Symmetric layouts
    # (simplex, polar) stop after a step or two, since features on their anchors are already
    # optimal; if a very large C runs out of steps, the value is still an upper bound on the
    # floor, and a tighter one than features on their anchors.
    iters = max(20, min(iters, int(2e10 / (c * c * b.shape[1]))))
    u = b.clone()
    y, t = u.clone(), 1.0
    best = losses(u).mean().item()
    for _ in range(iters):
        p = torch.softmax(scale * y @ b.T, 1)
        p[labels, labels] -= 1.0
        grad = scale * p @ b  # (C, r)
        u_next = project(y - step * grad)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = u_next + ((t - 1.0) / t_next) * (u_next - u)
        u, t = u_next, t_next
        value = losses(u).mean().item()
        if best - value < tol and value <= best:
            best = value
            break
        best = min(best, value)
    return best
