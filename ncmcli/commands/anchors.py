"""``ncm anchors``: build fixed class anchors, optionally save them, and return their
certificate."""

from __future__ import annotations

from pathlib import Path

from ncmcli.errors import UsageError, config_boundary
from ncmcli.nn.anchors import make_anchors, resolve_auto
from ncmcli.nn.certificate import anchor_certificate
from ncmcli.nn.distances import get_distance
from ncmcli.nn.floors import scale_for_floor
from ncmcli.storage import save_tensors

MAX_ANCHOR_CLASSES = 10_000  # the certificate compares all pairs: (C, C) float64 is 800 MB at the bound


MAX_ANCHOR_DIM = 65_536


MAX_ANCHOR_NUMBERS = 2**26


def anchors_command(
    classes: int,
    dim: int,
    method: str,
    *,
    seed: int = 0,
    metric: str = "euclidean",
    scale: float | str = 1.0,
    floor_target: float = 0.1,
    out: Path | None = None,
) -> dict:
    """Build anchors, optionally save them, and return their certificate as a dict.
    ``scale``: a number, or "auto" for the scale whose loss floor is ``floor_target`` nats."""

    with config_boundary():
        get_distance(metric)
    raw, scale = scale, "auto" if str(scale).strip().lower() == "auto" else _number(scale)
    if scale != "auto" and not (scale > 0 and scale != float("inf")):
        raise UsageError(f"--scale must be a finite number > 0 or auto, got {str(raw)[:40]!r}")
    if not 0 < floor_target < 10:
        raise UsageError(f"--floor-target must be in (0, 10) nats, got {floor_target}")
    # The certificate compares every pair of anchors: bound C and d before allocating.
    if not 2 <= classes <= MAX_ANCHOR_CLASSES:
        raise UsageError(f"--classes must be in [2, {MAX_ANCHOR_CLASSES}], got {classes}")
    if not 1 <= dim <= MAX_ANCHOR_DIM or classes * dim > MAX_ANCHOR_NUMBERS:
        raise UsageError(
            f"--dim must be in [1, {MAX_ANCHOR_DIM}] with classes x dim <= {MAX_ANCHOR_NUMBERS:,}, "
            f"got {classes} x {dim}"
        )
    if out is not None and (Path(out).is_dir() or str(out).endswith(("/", "\\"))):
        raise UsageError(
            f"--out {out} is a folder; give a file name such as {Path(out) / 'anchors.safetensors'}"
        )
    with config_boundary():
        a = make_anchors(method, classes, dim, seed=seed)
    label = f"auto ({resolve_auto(classes, dim)})" if method == "auto" else method
    if scale == "auto":
        try:
            value = scale_for_floor(a, metric, floor_target)
        except ValueError as exc:
            raise UsageError(f"--scale auto: {exc}") from None
    else:
        value = scale
    cert = anchor_certificate(a, label, metric=metric, scale=value).to_dict()
    if scale == "auto":
        cert["scale_setting"], cert["floor_target"] = "auto", floor_target
    if out is not None:
        meta = {"method": method, "seed": str(seed), "classes": str(classes), "dim": str(dim)}
        try:
            save_tensors(Path(out), {"anchors": a.contiguous()}, meta)
        except OSError as exc:
            raise UsageError(f"cannot write --out {out} ({exc.strerror or exc})") from None
    return cert


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")
