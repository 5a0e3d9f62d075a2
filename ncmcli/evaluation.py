"""Looking at trained models: `ncm eval` (accuracy, diagnostics, open-set) and `ncm plot`."""

from __future__ import annotations

from pathlib import Path

from ncmcli.runfiles import resolve_checkpoint
from ncmcli.runtime import pick_device
from ncmcli.errors import UsageError


def _test_split(ck, data_root: str | None, limit: int = 0):
    """The test split a checkpoint was trained for, checked against its classes and shape."""
    import dataclasses

    from ncmcli.data import load_dataset
    from ncmcli.errors import DataError

    data_cfg = ck.config.data
    if data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=data_root)
    data_cfg = dataclasses.replace(data_cfg, limit_test=limit or data_cfg.limit_test)
    if data_cfg.name == "folder":  # the size the checkpoint was trained at, not a new guess
        data_cfg = dataclasses.replace(data_cfg, channels=ck.input_shape[0], image_size=ck.input_shape[1])
    data = load_dataset(data_cfg, train=False)
    if data.classes != ck.classes:
        raise DataError(f"the test data has classes {data.classes[:5]}..., the checkpoint {ck.classes[:5]}...")
    if data.input_shape != ck.input_shape:
        raise DataError(f"the test data has input shape {data.input_shape}, the checkpoint {ck.input_shape}")
    return data


def _ood_images(source: str, ck, data_root: str | None, limit: int):
    """Out-of-distribution test images: a dataset name's test split or an image folder,
    converted to the checkpoint's channels and size."""
    import torch

    from ncmcli.config import DataConfig
    from ncmcli.registry import DATASETS
    from ncmcli.data import load_dataset
    from ncmcli.images import IMAGE_SUFFIXES, load_image

    c, h, _ = ck.input_shape
    if source in DATASETS and source != "folder" and not Path(source).exists():
        ds = load_dataset(DataConfig(name=source, root=data_root or "", limit_test=limit), train=False)
        x = ds.test.images.float()
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != h:
            x = torch.nn.functional.interpolate(x, size=(h, h), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)
    folder = Path(source)
    if not folder.is_dir():
        raise UsageError(f"--ood {source!r} is neither a dataset ({', '.join(d for d in DATASETS if d != 'folder')}) nor a folder")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    if not files:
        raise UsageError(f"--ood folder {folder} holds no images")
    return torch.stack([load_image(f, c, h)[0] for f in files])


def eval_command(target: Path, *, data_root: str | None, device: str, batch_size: int | None = None,
                 limit: int = 0, ood: str | None = None) -> dict:
    """Accuracy, loss, per-class accuracy, confusion, and feature diagnostics on the test split."""
    import torch

    from ncmcli import checkpoint, diagnostics
    from ncmcli.batching import Split
    from ncmcli.forward import evaluate

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit < 0:
        raise UsageError(f"--limit must be >= 0, got {limit}")
    path = resolve_checkpoint(target)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    batch_size = batch_size or ck.config.train.eval_batch_size  # the checkpoint's own setting
    data = _test_split(ck, data_root, limit)
    test = data.test.to(dev)
    ev = evaluate(ck.model, ck.criterion, test, mean=ck.mean, std=ck.std, device=dev,
                  batch_size=batch_size, num_classes=len(ck.classes), keep_outputs=True)
    feats, logits, labels = ev.pop("features"), ev.pop("logits"), ev.pop("labels")  # one pass, not two
    diag = {"ece_15_bins": diagnostics.expected_calibration_error(torch.softmax(logits, 1), labels)}
    scores, macro_f1 = diagnostics.per_class_scores(ev["confusion"])
    has_anchors = ck.criterion.uses_anchors
    if has_anchors:
        with torch.no_grad():
            dist = ck.criterion.distances(feats.to(dev)).cpu()  # (N, C)
        diag.update(diagnostics.anchor_report(dist, labels, ck.classes))
        nearest = dist.min(1).values
        diag["reject_above_at_95_tpr"] = torch.quantile(nearest.double(), 0.95).item()
    result = {
        "checkpoint": str(path), "dataset": data.name, "epoch": ck.epoch,
        "accuracy": ev["accuracy"], "error_pct": ev["error_pct"], "loss": ev["loss"], "n": ev["n"],
        "per_class_accuracy": dict(zip(ck.classes, ev["per_class_accuracy"])),
        "top5_accuracy": diagnostics.topk_accuracy(logits, labels, 5) if len(ck.classes) > 5 else None,
        "per_class": dict(zip(ck.classes, scores)), "macro_f1": macro_f1,
        "classes": ck.classes, "confusion": ev["confusion"], "diagnostics": diag,
    }
    if ood is not None:
        images = _ood_images(ood, ck, data_root, limit)
        ood_split = Split(images, torch.zeros(len(images), dtype=torch.int64)).to(dev)
        f_ood, l_ood, _ = diagnostics.extract(ck.model, ck.criterion, ood_split, mean=ck.mean, std=ck.std,
                                              device=dev, batch_size=batch_size)
        if has_anchors:  # in-distribution = close to some anchor: score = -nearest distance
            with torch.no_grad():
                s_in = -nearest
                s_out = -ck.criterion.distances(f_ood.to(dev)).min(1).values.cpu()
            score = "negative distance to the nearest anchor"
        else:  # no anchors: the maximum softmax probability
            s_in, s_out = torch.softmax(logits, 1).max(1).values, torch.softmax(l_ood, 1).max(1).values
            score = "maximum softmax probability"
        fpr, thr = diagnostics.fpr_at_tpr(s_in, s_out, 0.95)
        result["ood"] = {"source": ood, "n_in": len(s_in), "n_out": len(s_out), "score": score,
                         "auroc": diagnostics.auroc(s_in, s_out), "fpr_at_95_tpr": fpr}
    return result


def _plot_out(out: Path | None, default_dir: Path, stem: str, fmt: str) -> Path:
    from ncmcli.plots import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is None:
        return default_dir / f"{stem}.{fmt}"
    out = Path(out)
    if out.is_dir():
        return out / f"{stem}.{fmt}"
    return out if out.suffix else out.with_suffix(f".{fmt}")


def plot_command(kind: str, target: Path | list[Path], *, out: Path | None, fmt: str = "png",
                 device: str = "auto", split: str = "test", max_points: int = 5000,
                 data_root: str | None = None) -> Path:
    """Draw one plot and return the file written."""
    import dataclasses

    import torch

    from ncmcli import checkpoint, diagnostics, plots
    from ncmcli.data import load_dataset
    from ncmcli.forward import evaluate

    plots._pyplot()  # fail early, with the install hint, before any work
    if kind == "curves":
        runs = []
        for t in target:
            t = Path(t)
            found = [t] if (t / "metrics.jsonl").is_file() else sorted(p.parent for p in t.rglob("metrics.jsonl"))
            if not found:
                raise UsageError(f"no metrics.jsonl in {t}")
            runs += found
        # Beside the run folder (one run), or in the runs' common parent folder (several).
        import os

        beside = runs[0] if len(runs) == 1 else Path(os.path.commonpath([str(r.resolve()) for r in runs]))
        return plots.curves(runs, _plot_out(out, beside, "curves", fmt))
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got {split!r}")
    path = resolve_checkpoint(target)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    name = f"{ck.config.loss.name} {ck.config.model.arch} on {ck.config.data.name}, epoch {ck.epoch}"
    if split == "train" and kind == "features":
        data_cfg = ck.config.data if data_root is None else dataclasses.replace(ck.config.data, root=data_root)
        data = load_dataset(data_cfg)
        s = data.train
    else:
        s = _test_split(ck, data_root).test
    if kind == "confusion":
        ev = evaluate(ck.model, ck.criterion, s.to(dev), mean=ck.mean, std=ck.std, device=dev,
                      batch_size=ck.config.train.eval_batch_size, num_classes=len(ck.classes))
        return plots.confusion(ev["confusion"], ck.classes, f"{name}: accuracy {ev['accuracy']:.4f}",
                               _plot_out(out, path.parent, "confusion", fmt))
    if max_points and len(s) > max_points:
        idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:max_points]
        s = s.subset(idx)
    feats, _, labels = diagnostics.extract(ck.model, ck.criterion, s.to(dev), mean=ck.mean, std=ck.std, device=dev,
                                           batch_size=ck.config.train.eval_batch_size)
    directions, direction_kind = diagnostics.class_directions(ck.criterion)
    if kind == "features":
        metric = ck.criterion.metric
        return plots.features(feats, labels, directions, direction_kind, ck.classes, metric=metric,
                              title=f"{name} ({split})", out=_plot_out(out, path.parent, f"features-{split}", fmt))
    if kind == "angles":
        if directions is None:
            raise UsageError("this checkpoint has neither anchors nor class weight vectors to measure angles to")
        return plots.angles(feats, labels, directions, direction_kind, name, _plot_out(out, path.parent, "angles", fmt))
    raise UsageError(f"unknown plot {kind!r}")
