"""``ncm plot``: the paper's Figures 2 and 3, training curves, confusion matrices and angle
histograms, drawn from a checkpoint or run folders."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from ncmcli.commands.evaluate import class_order, test_split
from ncmcli.data.datasets import load_dataset
from ncmcli.errors import UsageError
from ncmcli.nn import metrics
from ncmcli.reports import figures
from ncmcli.reports.figures import FORMATS
from ncmcli.runs import checkpoint
from ncmcli.runs.rundir import find_runs
from ncmcli.runs.runfiles import METRICS, resolve_checkpoint
from ncmcli.train.forward import evaluate, extract
from ncmcli.train.runtime import pick_device


def _plot_out(out: Path | None, default_dir: Path, stem: str, fmt: str) -> Path:

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is None:
        return default_dir / f"{stem}.{fmt}"
    out = Path(out)
    if out.is_dir():
        return out / f"{stem}.{fmt}"
    return out if out.suffix else out.with_suffix(f".{fmt}")


def plot_command(
    kind: str,
    target: Path | list[Path],
    *,
    out: Path | None,
    fmt: str = "png",
    device: str = "auto",
    split: str = "test",
    max_points: int = 5000,
    data_root: str | None = None,
    which: str = "best",
) -> Path:
    """Draw one plot and return the file written."""
    figures._pyplot()  # fail early, with the install hint, before any work
    if kind == "curves":
        return _curves(target, out, fmt)
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got {split!r}")
    path = resolve_checkpoint(target, which)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    name = f"{ck.config.loss.name} {ck.config.model.arch} on {ck.config.data.name}, epoch {ck.epoch}"
    s = _split(ck, "train" if split == "train" and kind == "features" else "test", data_root)
    if kind == "confusion":
        ev = evaluate(ck.classifier, s.to(dev), device=dev, batch_size=ck.config.train.eval_batch_size)
        return figures.confusion(
            ev["confusion"],
            ck.classes,
            f"{name}: accuracy {ev['accuracy']:.4f}",
            _plot_out(out, path.parent, "confusion", fmt),
        )
    if max_points and len(s) > max_points:
        idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:max_points]
        s = s.subset(idx)
    feats, _, labels = extract(
        ck.classifier, s.to(dev), device=dev, batch_size=ck.config.train.eval_batch_size
    )
    directions, direction_kind = metrics.class_directions(ck.criterion)
    if kind == "features":
        metric = ck.criterion.metric
        return figures.features(
            feats,
            labels,
            directions,
            direction_kind,
            ck.classes,
            metric=metric,
            title=f"{name} ({split})",
            out=_plot_out(out, path.parent, f"features-{split}", fmt),
        )
    if kind == "angles":
        if directions is None:
            raise UsageError(
                "this checkpoint has neither anchors nor class weight vectors to measure angles to"
            )
        return figures.angles(
            feats, labels, directions, direction_kind, name, _plot_out(out, path.parent, "angles", fmt)
        )
    raise UsageError(f"unknown plot {kind!r}")


def _split(ck, which: str, data_root: str | None):
    """The checkpoint's own training or test split (the training split for features only)."""
    if which == "test":
        return test_split(ck, data_root).test
    data_cfg = ck.config.data if data_root is None else replace(ck.config.data, root=data_root)
    return load_dataset(data_cfg, class_order=class_order(ck)).train


def _curves(targets: list[Path], out: Path | None, fmt: str) -> Path:
    """Training curves of the runs under ``targets``, written beside the run folder (one run)
    or in the runs' common parent folder (several)."""
    runs = []
    for t in map(Path, targets):
        found = find_runs([t], METRICS)
        if not found:
            raise UsageError(f"no metrics.jsonl in {t}")
        runs += found
    beside = runs[0] if len(runs) == 1 else Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return figures.curves(runs, _plot_out(out, beside, "curves", fmt))
