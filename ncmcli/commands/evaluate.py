"""``ncm eval``: accuracy, per-class and long-tail scores, diagnostics, post-hoc logit
adjustment and open-set scores of a checkpoint on its test split."""

from __future__ import annotations

from pathlib import Path

import torch

from ncmcli.config.schema import DataConfig
from ncmcli.data.batching import Split
from ncmcli.data.datasets import load_dataset
from ncmcli.data.images import IMAGE_SUFFIXES, load_image
from ncmcli.errors import DataError, UsageError
from ncmcli.nn import metrics, scores
from ncmcli.registry import DATASETS, suggest
from ncmcli.runs import checkpoint
from ncmcli.runs.incremental import task_accuracies
from ncmcli.runs.runfiles import resolve_checkpoint
from ncmcli.train.forward import evaluate, extract
from ncmcli.train.runtime import pick_device


def test_split(ck, data_root: str | None, limit: int = 0):
    """The test split a checkpoint was trained for, checked against its classes and shape."""
    import dataclasses

    data_cfg = ck.config.data
    if data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=data_root)
    data_cfg = dataclasses.replace(data_cfg, limit_test=limit or data_cfg.limit_test)
    if data_cfg.name == "folder":  # the size the checkpoint was trained at, not a new guess
        data_cfg = dataclasses.replace(data_cfg, channels=ck.input_shape[0], image_size=ck.input_shape[1])
    data = load_dataset(data_cfg, train=False, class_order=class_order(ck))
    if data.classes != ck.classes:
        raise DataError(
            f"the test data has classes {data.classes[:5]}..., the checkpoint {ck.classes[:5]}..."
        )
    if data.input_shape != ck.input_shape:
        raise DataError(f"the test data has input shape {data.input_shape}, the checkpoint {ck.input_shape}")
    return data


def class_order(ck):
    """An extended checkpoint's classes (every task's, in its order), for the data loader; None
    for others, whose data.classes already says which."""
    return list(ck.classes) if ck.tasks and len(ck.tasks) > 1 else None


def _ood_images(source: str, ck, data_root: str | None, limit: int):
    """Out-of-distribution test images: a dataset name's test split or an image folder,
    converted to the checkpoint's channels and size."""
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
        raise UsageError(
            f"--ood {source!r} is neither a dataset ({', '.join(d for d in DATASETS if d != 'folder')}) nor a folder"
        )
    if (folder / "test").is_dir():  # a train/ + test/ data set: its held-out part only
        folder = folder / "test"
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if limit and limit < len(files):  # a seeded sample, not the first classes' files
        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:limit]
        files = [files[i] for i in sorted(pick.tolist())]
    if not files:
        raise UsageError(f"--ood folder {folder} holds no images")
    return torch.stack([load_image(f, c, h)[0] for f in files])


def eval_command(
    target: Path,
    *,
    data_root: str | None,
    device: str,
    batch_size: int | None = None,
    limit: int = 0,
    ood: str | None = None,
    logit_adjust: float = 0.0,
    ood_score: str | None = None,
    which: str = "best",
    ood_limit: int | None = None,
) -> dict:
    """Accuracy, loss, per-class accuracy, confusion, long-tail metrics and feature diagnostics
    on the test split; ``logit_adjust`` tau > 0 predicts with post-hoc adjusted logits."""
    _check_eval_options(logit_adjust, ood_score, batch_size, limit, ood_limit)
    path = resolve_checkpoint(target, which)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    batch_size = batch_size or ck.config.train.eval_batch_size  # the checkpoint's own setting
    data = test_split(ck, data_root, limit)
    ev = evaluate(ck.classifier, data.test.to(dev), device=dev, batch_size=batch_size, keep_outputs=True)
    if hasattr(data.test, "close"):  # a folder read per batch: its workers stop now
        data.test.close()
    feats, logits, labels = ev.pop("features"), ev.pop("logits"), ev.pop("labels")  # one pass, not two
    raw_logits, adjusted = logits, None
    if logit_adjust > 0:
        logits, adjusted = _post_hoc(ck, path, ev, logits, labels, logit_adjust)
    diag, dist = _diagnostics(ck, feats, logits, labels, dev)
    per_class, macro_f1 = metrics.per_class_scores(ev["confusion"])
    result = {
        "checkpoint": str(path),
        "dataset": data.name,
        "epoch": ck.epoch,
        "accuracy": ev["accuracy"],
        "error_pct": ev["error_pct"],
        "loss": ev["loss"],
        "n": ev["n"],
        "per_class_accuracy": dict(zip(ck.classes, ev["per_class_accuracy"])),
        "top5_accuracy": metrics.topk_accuracy(logits, labels, 5) if len(ck.classes) > 5 else None,
        "per_class": dict(zip(ck.classes, per_class)),
        "macro_f1": macro_f1,
        **scores.imbalance_metrics(ev["confusion"], ck.class_counts),
        "train_counts": None if ck.class_counts is None else dict(zip(ck.classes, ck.class_counts)),
        "imbalance": ck.imbalance or None,
        "logit_adjust": adjusted,
        "classes": ck.classes,
        "confusion": ev["confusion"],
        "diagnostics": diag,
    }
    if ck.criterion.uses_anchors:
        result["scale"] = ck.criterion.scale_value()
    if ck.tasks and len(ck.tasks) > 1:  # class-incremental: every run's classes, the last one's new
        result["tasks"] = task_accuracies(ev["confusion"], ck.classes, ck.tasks)
        result["parent"] = ck.parent
    if ood is not None:
        outside = _ood_outputs(ck, ood, data_root, limit if ood_limit is None else ood_limit, dev, batch_size)
        result["ood"] = _open_set(ood, raw_logits, dist, *outside, ood_score)
    return result


def _ood_outputs(ck, source: str, data_root, limit: int, dev, batch_size: int):
    """(logits, anchor distances or None) of the open-set images, on the CPU."""
    images = _ood_images(source, ck, data_root, limit)
    split = Split(images, torch.zeros(len(images), dtype=torch.int64)).to(dev)
    feats, logits, _ = extract(ck.classifier, split, device=dev, batch_size=batch_size)
    if not ck.criterion.uses_anchors:
        return logits, None
    with torch.no_grad():
        return logits, ck.criterion.distances(feats.to(dev)).cpu()


def _check_eval_options(logit_adjust, ood_score, batch_size, limit, ood_limit) -> None:
    import math

    if not (math.isfinite(logit_adjust) and 0 <= logit_adjust <= 10):
        raise UsageError(f"--logit-adjust must be in [0, 10], got {logit_adjust}")
    if ood_score is not None and ood_score not in scores.OOD_SCORES:
        raise UsageError(
            f"--ood-score must be one of {', '.join(scores.OOD_SCORES)}, got {ood_score!r}"
            + suggest(ood_score, scores.OOD_SCORES)
        )
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit < 0:
        raise UsageError(f"--limit must be >= 0, got {limit}")
    if ood_limit is not None and ood_limit < 0:
        raise UsageError(f"--ood-limit must be >= 0, got {ood_limit}")


def _diagnostics(ck, feats, logits, labels, dev):
    """(calibration and feature diagnostics, the (N, C) distances to the anchors or None)."""
    diag = {
        "ece_15_bins": metrics.expected_calibration_error(torch.softmax(logits, 1), labels),
        "feature_norm_median": feats.double().norm(dim=1).median().item(),
    }
    if not ck.criterion.uses_anchors:
        return diag, None
    with torch.no_grad():
        dist = ck.criterion.distances(feats.to(dev)).cpu()  # (N, C)
    diag.update(metrics.anchor_report(dist, labels, ck.classes))
    nearest, margin = metrics.nearest_two(dist)
    diag["reject_above_at_95_tpr"] = torch.quantile(nearest.double(), 0.95).item()
    diag["reject_below_margin_at_95_tpr"] = torch.quantile(margin.double(), 0.05).item()
    return diag, dist


def _post_hoc(ck, path, ev: dict, logits, labels, tau: float):
    """Post-hoc logit adjustment: the adjusted logits, and ``ev``'s accuracy, error, confusion
    and per-class accuracy recomputed from their argmax (the unadjusted accuracy kept beside)."""

    if ck.class_counts is None:
        raise UsageError(
            f"--logit-adjust needs the training class counts, and {path} has none "
            "(checkpoints from this version of ncm store them)"
        )
    try:
        logits = scores.adjusted_logits(logits, ck.class_counts, tau)
    except ValueError as exc:
        raise UsageError(f"--logit-adjust: {exc}") from None
    adjusted = {"tau": tau, "unadjusted_accuracy": ev["accuracy"]}
    conf = scores.confusion_of(logits.argmax(1), labels, len(ck.classes))
    correct = int(conf.diag().sum())
    ev.update(
        accuracy=correct / ev["n"],
        error_pct=100.0 * (1 - correct / ev["n"]),
        confusion=conf.tolist(),
        per_class_accuracy=[int(h) / int(t) if t else None for h, t in zip(conf.diag(), conf.sum(1))],
    )
    return logits, adjusted


def _open_set(source: str, logits_in, dist_in, logits_out, dist_out, choice: str | None) -> dict:
    """AUROC and FPR at 95% TPR of every score that applies; the chosen one (default: the
    maximum softmax probability, measured best on real pairs) is the headline. Any AUROC below
    0.5 gets a warning: that score ranks unknowns as more known than knowns."""

    s_in, s_out = scores.ood_scores(logits_in, dist_in), scores.ood_scores(logits_out, dist_out)
    primary = choice or scores.DEFAULT_OOD_SCORE
    if primary not in s_in:
        raise UsageError(f"--ood-score {primary} needs an anchor model; this one offers {', '.join(s_in)}")
    by_score = {}
    for name in s_in:
        fpr, _ = metrics.fpr_at_tpr(s_in[name], s_out[name], 0.95)
        by_score[name] = {"auroc": metrics.auroc(s_in[name], s_out[name]), "fpr_at_95_tpr": fpr}
    inverted = [n for n, v in by_score.items() if v["auroc"] < 0.5]
    better = max(by_score, key=lambda n: by_score[n]["auroc"])
    warnings = [
        f"--ood-score {n} has AUROC {by_score[n]['auroc']:.4f} < 0.5: the score ranks unknowns as more "
        f"known; try --ood-score {better}"
        for n in inverted
    ]
    return {
        "source": source,
        "n_in": len(logits_in),
        "n_out": len(logits_out),
        "score": primary,
        "score_description": scores.OOD_SCORES[primary][0],
        "auroc": by_score[primary]["auroc"],
        "fpr_at_95_tpr": by_score[primary]["fpr_at_95_tpr"],
        "by_score": by_score,
        "warnings": warnings,
    }
