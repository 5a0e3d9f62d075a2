"""What the CLI commands do, as plain functions that return data and raise NcmError."""

from __future__ import annotations

from pathlib import Path

from ncmcli.errors import UsageError


def anchors_command(
    classes: int, dim: int, method: str, *, seed: int = 0, metric: str = "euclidean",
    scale: float = 1.0, out: Path | None = None,
) -> dict:
    """Build anchors, optionally save them, and return their certificate as a dict."""
    from ncmcli.anchors import anchor_certificate, make_anchors, resolve_auto
    from ncmcli.distances import get_distance

    get_distance(metric)
    if not scale > 0:
        raise UsageError(f"--scale must be > 0, got {scale}")
    a = make_anchors(method, classes, dim, seed=seed)
    label = f"auto ({resolve_auto(classes, dim)})" if method == "auto" else method
    cert = anchor_certificate(a, label, metric=metric, scale=scale).to_dict()
    if out is not None:
        from safetensors.torch import save_file

        from ncmcli.checkpoint import atomic_write

        meta = {"method": method, "seed": str(seed), "classes": str(classes), "dim": str(dim)}
        atomic_write(Path(out), lambda tmp: save_file({"anchors": a.contiguous()}, str(tmp), metadata=meta))
    return cert
