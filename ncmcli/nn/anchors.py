"""Fixed class anchors: unit-norm vectors a_1..a_C in R^d with large pairwise angles.

``make_anchors`` builds them; ``anchor_certificate`` says how good they are and what loss
floor they impose. Every method is deterministic for a given seed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ncmcli.errors import special_file
from ncmcli.nn.certificate import duplicate_pairs, pairwise_angles, unit_rows
from ncmcli.registry import ANCHOR_FILE_SUFFIXES, ANCHOR_METHODS, suggest
from ncmcli.storage import (
    CorruptFile,
    FileNote,
    cache_dir,
    read_tensor_file,
    remove_stale_temps,
    save_tensors,
)

METHODS = tuple(ANCHOR_METHODS)


def make_anchors(method: str, num_classes: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """(C, d) float32 anchors with unit rows. ``method`` is one of ``METHODS`` or a path to
    a ``.safetensors`` (key ``anchors``) or ``.csv`` file with one row per class."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    c, d = num_classes, dim
    if method.endswith(ANCHOR_FILE_SUFFIXES):
        return unit_rows(_from_file(Path(method), c, d)).float()
    if method == "auto":
        return make_anchors(resolve_auto(c, d), c, d, seed=seed)
    build = ANCHOR_BUILDERS.get(method)
    if build is None:
        raise ValueError(
            f"unknown anchor method {method!r}; choose one of: {', '.join(METHODS)}, "
            f"or a .safetensors/.csv file" + suggest(method, METHODS)
        )
    return unit_rows(build(c, d, seed)).float()


# The registered methods (registry.ANCHOR_METHODS): (C, d, seed) -> (C, d) float64 rows.


def orthogonal(c: int, d: int, seed: int = 0) -> torch.Tensor:
    if d < c:
        raise ValueError(
            f"orthogonal anchors need dim >= classes (got classes={c}, dim={d}); "
            f"use simplex (classes <= dim+1), orthoplex (classes <= 2*dim), optimized or auto"
        )
    return torch.eye(c, d, dtype=torch.float64)


def polar(c: int, d: int, seed: int = 0) -> torch.Tensor:
    return _polar(c, d)


def simplex(c: int, d: int, seed: int = 0) -> torch.Tensor:
    if c > d + 1:
        raise ValueError(
            f"simplex anchors need classes <= dim+1 (got classes={c}, dim={d}); "
            f"use orthoplex (classes <= 2*dim), optimized or auto"
        )
    return _simplex(c, d)


def orthoplex(c: int, d: int, seed: int = 0) -> torch.Tensor:
    if c > 2 * d:
        raise ValueError(
            f"orthoplex anchors need classes <= 2*dim (got classes={c}, dim={d}); use optimized or auto"
        )
    return _orthoplex(c, d)


def optimized(c: int, d: int, seed: int = 0) -> torch.Tensor:
    return _cached_optimized(c, d, seed)


def random_rows(c: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(c, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def resolve_auto(num_classes: int, dim: int) -> str:
    """The best closed form for (C, d): simplex, then orthoplex, else the optimiser."""
    if num_classes <= dim + 1:
        return "simplex"
    return "orthoplex" if num_classes <= 2 * dim else "optimized"


def _simplex(c: int, d: int) -> torch.Tensor:
    # The centred basis e_i - 1/C spans a (C-1)-dim subspace; its SVD gives coordinates in
    # an orthonormal basis of it, which fit in R^d whenever C <= d + 1.
    centred = torch.eye(c, dtype=torch.float64) - 1.0 / c  # (C, C)
    u, s, _ = torch.linalg.svd(centred)
    coords = u[:, : c - 1] * s[: c - 1]  # (C, C-1)
    out = torch.zeros(c, d, dtype=torch.float64)
    out[:, : c - 1] = coords
    return out


def _orthoplex(c: int, d: int) -> torch.Tensor:
    # +e_1, -e_1, +e_2, -e_2, ...: any two rows are 90 or 180 degrees apart.
    out = torch.zeros(c, d, dtype=torch.float64)
    for i in range(c):
        out[i, i // 2] = 1.0 if i % 2 == 0 else -1.0
    return out


def _hyperspherical(angles: torch.Tensor) -> torch.Tensor:
    """(N, m-1) polar angles -> (N, m) unit vectors."""
    n, k = angles.shape
    out = torch.ones(n, k + 1, dtype=torch.float64)
    sin_prod = torch.ones(n, dtype=torch.float64)
    for j in range(k):
        out[:, j] = sin_prod * torch.cos(angles[:, j])
        sin_prod = sin_prod * torch.sin(angles[:, j])
    out[:, k] = sin_prod
    return out


def _polar(c: int, d: int) -> torch.Tensor:
    """The paper's meshgrid over polar angles. For d = 2 exactly C equal angles 2*pi/C.

    For d > 2 a plain grid repeats points at the poles and crowds them there, so the grid
    points are de-duplicated and C of them are picked by farthest-point sampling."""
    if d == 1:
        if c > 2:
            raise ValueError("polar anchors in dim 1 allow at most 2 classes; use dim >= 2")
        return torch.tensor([[1.0], [-1.0]], dtype=torch.float64)[:c]
    if d == 2:
        theta = torch.arange(c, dtype=torch.float64) * (2 * math.pi / c)
        return torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    m = min(d, 8)  # grid over the first m coordinates; the rest stay zero
    levels = max(3, int(20000 ** (1.0 / (m - 1))))
    while True:
        inner = torch.linspace(0, math.pi, levels, dtype=torch.float64)
        outer = torch.arange(levels, dtype=torch.float64) * (2 * math.pi / levels)
        grids = torch.meshgrid(*([inner] * (m - 2) + [outer]), indexing="ij")
        pts = _hyperspherical(torch.stack([g.reshape(-1) for g in grids], 1))
        pts = torch.unique(torch.round(pts, decimals=9), dim=0)
        if pts.shape[0] >= c:
            break
        levels *= 2
    chosen = [0]
    best = pts @ pts[0]  # (N,) max cosine to the chosen set so far
    for _ in range(c - 1):
        nxt = int(best.argmin())
        chosen.append(nxt)
        best = torch.maximum(best, pts @ pts[nxt])
    out = torch.zeros(c, d, dtype=torch.float64)
    out[:, :m] = pts[chosen]
    return out


def _min_angle(a: torch.Tensor) -> float:
    return pairwise_angles(a).min().item()


def _optimized(c: int, d: int, seed: int, steps: int = 1500) -> torch.Tensor:
    """Maximise the minimum pairwise angle (the Tammes problem) by projected gradient
    descent on a soft maximum of pairwise cosines, sharpened as it goes. The result is
    never worse than the best closed form that applies, which seeds the search."""
    g = torch.Generator().manual_seed(seed)
    starts = [torch.randn(c, d, generator=g, dtype=torch.float64)]
    if d == 2:
        starts.append(_polar(c, d))
    if c <= d + 1:
        starts.append(_simplex(c, d))
    elif c <= 2 * d:
        starts.append(_orthoplex(c, d))
    best, best_angle = None, -1.0
    off_diag = ~torch.eye(c, dtype=torch.bool)
    for start in starts:
        x = unit_rows(start.clone()).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.02)
        for step in range(steps):
            t = 10.0 + 490.0 * step / steps  # sharpness: from smooth energy to min angle
            xn = unit_rows(x)
            cos = (xn @ xn.T)[off_diag]
            loss = torch.logsumexp(t * cos, 0) / t
            opt.zero_grad()
            loss.backward()
            opt.step()
            for group in opt.param_groups:
                group["lr"] = 0.02 * (1 - step / steps) + 1e-4
            if step % 50 == 0 or step == steps - 1:
                with torch.no_grad():
                    cand = unit_rows(x.detach())
                    ang = _min_angle(cand)
                    if ang > best_angle:
                        best, best_angle = cand.clone(), ang
        cand = unit_rows(start)
        if _min_angle(cand) >= best_angle:
            best, best_angle = cand, _min_angle(cand)
    return best


OPTIMIZED_VERSION = 1  # bumped when _optimized's result changes: old cache files are then ignored


def _cached_optimized(c: int, d: int, seed: int) -> torch.Tensor:
    """``_optimized``, computed once per (C, d, seed) and kept under the cache folder
    ($NCM_CACHE/anchors): 1,000 classes at d = 128 take minutes on a CPU, and every later run
    (and every DDP rank) reads them back. Float64 on the CPU, so that every machine gets the same
    anchors; an unreadable or mismatched cache file is recomputed and replaced."""
    path = cache_dir() / "anchors" / f"optimized-v{OPTIMIZED_VERSION}-c{c}-d{d}-seed{seed}.safetensors"
    if path.is_file():
        remove_stale_temps(path.parent)
        try:
            a = read_tensor_file(path, note_undigested=False).tensors()["anchors"]
            if (
                tuple(a.shape) == (c, d)
                and a.dtype == torch.float64
                and bool(((a.norm(dim=1) - 1).abs() < 1e-6).all())
            ):
                return a
        except CorruptFile as exc:  # recomputed below, with a note
            warnings.warn(FileNote(f"note: {exc}; recomputing the anchors"), stacklevel=2)
        except Exception:  # a torn or foreign file: recompute below
            pass
    a = _optimized(c, d, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"anchors": a.contiguous()})
    except OSError:  # a read-only cache: the anchors are still right, only not kept
        pass
    return a


def _from_file(path: Path, c: int, d: int) -> torch.Tensor:
    if not path.is_file():
        kind = special_file(path)
        raise ValueError(
            f"anchor file {path} is {kind}, not a regular file" if kind else f"anchor file not found: {path}"
        )
    try:
        if path.suffix == ".csv":
            rows = [
                [float(v) for v in line.split(",")] for line in path.read_text().splitlines() if line.strip()
            ]
            a = torch.tensor(rows, dtype=torch.float64)
        else:
            a = read_tensor_file(path, note_undigested=False).tensors()["anchors"].double()
    except KeyError:
        raise ValueError(f"{path}: no tensor named 'anchors'") from None
    except Exception as exc:  # malformed CSV numbers, ragged rows, corrupt safetensors
        raise ValueError(f"{path}: cannot read anchors ({exc})") from None
    if a.ndim != 2 or tuple(a.shape) != (c, d):
        raise ValueError(f"{path}: anchors have shape {tuple(a.shape)}, expected ({c}, {d})")
    if not torch.isfinite(a).all():
        raise ValueError(f"{path}: anchors contain NaN or Inf")
    if (a.norm(dim=1) == 0).any():
        raise ValueError(f"{path}: anchor rows {_zero_rows(a)} are zero")
    dup = duplicate_pairs(unit_rows(a))
    if dup:
        raise ValueError(f"{path}: duplicate anchor rows {dup[:5]}")
    return a


def _zero_rows(a: torch.Tensor) -> list[int]:
    return (a.norm(dim=1) == 0).nonzero().flatten().tolist()


# The registered methods (registry.ANCHOR_METHODS, but "auto", which resolve_auto maps to one
# of these): (C, d, seed) -> (C, d) float64 rows.
ANCHOR_BUILDERS = {
    "orthogonal": orthogonal,
    "polar": polar,
    "simplex": simplex,
    "orthoplex": orthoplex,
    "optimized": optimized,
    "random": random_rows,
}
