"""Pictures: the paper's Figure 2 (features and anchors) and Figure 3 (convergence),
confusion matrices and angle histograms. matplotlib is optional (``pip install
'ncmcli[plot]'``) and always renders headless (Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ncmcli.config.overrides import dotted
from ncmcli.config.presets import load_yaml_text
from ncmcli.errors import NcmError
from ncmcli.nn.metrics import pca_2d
from ncmcli.registry import keys_read
from ncmcli.runs.rundir import RunDir
from ncmcli.storage import atomic_write

FORMATS = ("png", "svg", "pdf")
INSTALL_HINT = "plotting needs matplotlib: pip install 'ncmcli[plot]'"


class PlotDependencyError(NcmError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotDependencyError(INSTALL_HINT) from None
    matplotlib.use("Agg")  # headless: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i if n <= 20 else i / n) for i in range(n)]


def _save(fig, out: Path) -> Path:

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise NcmError(f"{out}: the plot format must be one of {', '.join(FORMATS)}")
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=fig.dpi))
    _pyplot().close(fig)
    return out


def feature_layout(
    feats: torch.Tensor, directions: torch.Tensor | None, direction_kind: str, *, metric: str | None
) -> dict:
    """Where Figure 2 puts things: the features' 2-D coordinates (the features themselves for
    d = 2, else a PCA), the class vectors' coordinates through the *same* map, the axis labels
    and the caption lines."""

    out: dict = {"caption": [], "title_suffix": ""}
    if feats.shape[1] == 2:

        def proj(a):
            return a.double()

        out["axes"] = ("feature 1", "feature 2")
    else:
        mu, comps, ratio = pca_2d(feats)

        def proj(a):  # the same map for the features and the anchors
            return (a.double() - mu) @ comps

        out["axes"] = (f"PC 1 ({100 * ratio[0]:.1f}% var.)", f"PC 2 ({100 * ratio[1]:.1f}% var.)")
        out["title_suffix"] = f" — PCA, {100 * sum(ratio):.1f}% of the variance"
    out["xy"] = proj(feats)
    out["stars"] = None
    if directions is not None:
        a = directions.double()
        radius = feats.double().norm(dim=1).median().item()
        if metric == "cosine" or direction_kind != "anchors":
            # C-NCM ignores feature length (and softmax weights are not positions), so the unit
            # vectors are drawn scaled to the median feature norm, as the paper drew C-NCM.
            factor = radius / a.norm(dim=1).median().item()
            a = a * factor
            out["caption"].append(f"{direction_kind} drawn scaled ×{factor:.1f} (to the median feature norm)")
        else:
            ratio = radius / max(a.norm(dim=1).median().item(), 1e-12)
            if ratio > 3 or ratio < 1 / 3:
                out["caption"].append(
                    f"{direction_kind} at their true positions: median feature norm "
                    f"{radius:.2f}, anchor norm {a.norm(dim=1).median():.2f}"
                )
        out["stars"] = proj(a)
        out["caption"].append(f"stars: {direction_kind}, labelled by class")
    return out


def features(
    feats: torch.Tensor,
    labels: torch.Tensor,
    directions: torch.Tensor | None,
    direction_kind: str,
    classes: list[str],
    *,
    metric: str | None,
    title: str,
    out: Path,
) -> Path:
    """Figure 2: features coloured by class, each class vector drawn as a labelled star on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    colors = _colors(len(classes))
    lay = feature_layout(feats, directions, direction_kind, metric=metric)
    xy = lay["xy"]
    for c, name in enumerate(classes):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.5, color=colors[c], label=name, rasterized=True)
    if lay["stars"] is not None:
        p = lay["stars"]
        for c in range(len(classes)):
            ax.scatter(
                p[c, 0],
                p[c, 1],
                marker="*",
                s=320,
                color=colors[c],
                edgecolors="black",
                linewidths=1.0,
                zorder=5,
            )
            if len(classes) <= 20:
                ax.annotate(
                    classes[c],
                    (p[c, 0].item(), p[c, 1].item()),
                    xytext=(6, 6),
                    textcoords="offset points",
                    fontsize=7,
                    zorder=6,
                )
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel(lay["axes"][0])
    ax.set_ylabel(lay["axes"][1])
    ax.set_title(title + lay["title_suffix"], fontsize=10)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best", framealpha=0.8)
    if lay["caption"]:
        fig.text(0.01, 0.01, "; ".join(lay["caption"]), fontsize=8)
    return _save(fig, out)


def curve_labels(runs: list[Path]) -> list[str]:
    """One legend label per run: only the config keys that vary across the runs (never the
    data path), else the run folder's name."""

    flats = []
    for run in runs:
        try:
            tree = load_yaml_text(RunDir(run).config_text(), str(RunDir(run).config))
        except (OSError, NcmError, ValueError):
            tree = None
        # A loss key this run's loss never reads (lambda_gamma on SoftMax) says nothing about it.
        flat = keys_read(dotted(tree)) if isinstance(tree, dict) else {}
        try:  # what 0 and auto became (the image side, the scale), when the run has finished
            resolved = RunDir(run).result().get("resolved") or {}
        except (OSError, ValueError, AttributeError):
            resolved = {}
        flat.update({k: v for k, v in resolved.items() if k in flat} if isinstance(resolved, dict) else {})
        flats.append(flat)
    keys = sorted({k for f in flats for k in f} - {"description", "data.root"})
    # A key varies if the runs that read it disagree on it.
    vary = [k for k in keys if len({repr(f[k]) for f in flats if k in f}) > 1]
    # A key goes by its last part (lr, epochs) unless another key shares that part, as
    # loss.name and data.name do; then by its whole dotted name.
    last = [k.split(".")[-1] for k in keys]
    short = {k: k.split(".")[-1] if last.count(k.split(".")[-1]) == 1 else k for k in vary}
    return [
        ", ".join(f"{short[k]}={f[k]}" for k in vary if k in f) or run.name for run, f in zip(runs, flats)
    ]


def curves(runs: list[Path], out: Path) -> Path:
    """Figure 3: training loss and test error per epoch; each NCM run's loss floor dashed.
    The legend sits outside the axes and names only what differs between the runs."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    colors = _colors(max(len(runs), 1))
    has_val = False
    for color, run, label in zip(colors, runs, curve_labels(runs)):
        folder = RunDir(run)
        rows = folder.metrics()
        if not rows:
            raise NcmError(f"{folder.metrics_file} has no epochs yet")
        floor = None
        if folder.has_result():
            try:
                floor = folder.result().get("loss_floor")
            except ValueError:
                floor = None
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=label)
        ax_err.plot(epochs, [r["test_error_pct"] for r in rows], color=color, label=label)
        if any("val_error_pct" in r for r in rows):  # the curve best.safetensors is chosen on
            val = [(r["epoch"], r["val_error_pct"]) for r in rows if "val_error_pct" in r]
            ax_err.plot(*zip(*val), color=color, linestyle=":", label=f"{label} (validation)")
            has_val = True
        if floor is not None:
            ax_loss.axhline(floor, color=color, linestyle="--", linewidth=1)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (dashed: NCM loss floor)")
    ax_err.set(
        xlabel="epoch", ylabel="error %", title="test error (dotted: validation)" if has_val else "test error"
    )
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax_err.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, out)


def confusion(matrix: list[list[int]], classes: list[str], title: str, out: Path) -> Path:
    """Row-normalised confusion matrix; per-cell numbers only while they stay readable."""
    plt = _pyplot()
    m = torch.tensor(matrix, dtype=torch.float64)
    m = m / m.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    size = 6 if n <= 20 else 10
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=120)
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    # Past 30 classes, name every k-th class only, so that the names stay legible.
    every = 1 if n <= 30 else math.ceil(n / 25)
    ticks = list(range(0, n, every))
    font = 8 if n <= 20 else 6
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=font)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    return _save(fig, out)


def angles(
    feats: torch.Tensor,
    labels: torch.Tensor,
    directions: torch.Tensor,
    direction_kind: str,
    title: str,
    out: Path,
) -> Path:
    """Histograms of the angle from each feature to its own class vector and to the nearest
    other one: well-trained NCM features sit near 0 degrees from their own anchor."""
    plt = _pyplot()
    fn = torch.nn.functional.normalize(feats.double(), dim=1)
    an = torch.nn.functional.normalize(directions.double(), dim=1)
    ang = torch.rad2deg(torch.arccos((fn @ an.T).clamp(-1, 1)))  # (N, C)
    own = ang[torch.arange(len(labels)), labels]
    ang[torch.arange(len(labels)), labels] = math.inf
    other = ang.min(1).values
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    bins = torch.linspace(0, 180, 61).numpy()
    ax.hist(own.numpy(), bins=bins, alpha=0.6, label=f"to own {direction_kind[:-1]} (mean {own.mean():.1f}°)")
    ax.hist(other.numpy(), bins=bins, alpha=0.6, label=f"to nearest other (mean {other.mean():.1f}°)")
    ax.set(xlabel="angle (degrees)", ylabel="test features", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
