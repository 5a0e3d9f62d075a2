"""What a run records: each epoch's metrics line, the result record (result.json and
``--json``), what auto settings resolved to, which metric picks best.safetensors, and what the
run announces at its start."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ncmcli.config.schema import Config
from ncmcli.nn.certificate import anchor_certificate
from ncmcli.nn.floors import top_probability
from ncmcli.nn.scores import imbalance_metrics
from ncmcli.runs import runfiles
from ncmcli.runs.incremental import task_accuracies
from ncmcli.train.runtime import dist_info
from ncmcli.train.setup import Setup, evaluated


def epoch_metrics(run: Setup, epoch: int, trained: tuple, ev: dict, val: dict | None) -> dict:
    """One metrics.jsonl line: losses and accuracies, balanced test accuracy (and, on
    long-tailed data, head/medium/tail), and an NCM loss's scale (moved only by learn).
    ``trained``: the epoch's (train loss, train accuracy, seconds, images), as
    ``EpochCursor.finish`` returns them; the learning rate is read before the epoch-counted
    schedules step."""
    train_loss, train_acc, epoch_time, seen = trained

    metrics = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": ev["loss"],
        "test_acc": ev["accuracy"],
        "test_error_pct": ev["error_pct"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_time_s": round(epoch_time, 3),
        "images_per_s": round(seen / max(epoch_time, 1e-9), 1),
    }
    tail = imbalance_metrics(ev["confusion"], run.data.train_counts if run.data.imbalance else None)
    metrics["test_balanced_acc"] = tail["balanced_accuracy"]
    if run.data.imbalance:
        metrics.update({f"test_{k}_acc": tail[f"{k}_accuracy"] for k in ("head", "medium", "tail")})
    if len(run.lineage.tasks) > 1:  # class-incremental: the accuracy on each run's classes
        metrics["test_tasks"] = task_accuracies(ev["confusion"], run.data.classes, run.lineage.tasks)
    if val is not None:
        metrics.update(val_loss=val["loss"], val_acc=val["accuracy"], val_error_pct=val["error_pct"])
    crit = evaluated(run).criterion
    if crit.uses_anchors:
        metrics["scale"] = crit.scale_value()
    return metrics


# What result.json keeps of the final epoch's metrics line, and of the best one's.
FINAL_KEYS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_error_pct",
    "test_balanced_acc",
    "test_head_acc",
    "test_medium_acc",
    "test_tail_acc",
    "scale",
)
BEST_KEYS = ("epoch", "test_acc", "test_error_pct", "val_acc", "val_error_pct")


def result_record(
    cfg: Config, run: Setup, run_dir: Path, history: list[dict], *, device, preset, overrides, t_start: float
) -> dict:
    """What result.json (and ``--json``) holds."""
    final, best, world = history[-1], run.progress.best, dist_info()[1]
    result = {
        "status": "completed",
        "run_dir": str(run_dir),
        "preset": preset,
        "overrides": list(overrides),
        "dataset": run.data.name,
        "arch": cfg.model.arch,
        "loss": cfg.loss.name,
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "device": str(device),
        "final": {k: final[k] for k in FINAL_KEYS if k in final},
        "best": {k: best[k] for k in BEST_KEYS if k in best},
        "best_selected_on": {"val_acc": "validation", "test_acc": "test", "epoch": "last epoch"}[
            selection(run)[0]
        ],
        "test_acc": final["test_acc"],
        "test_error_pct": final["test_error_pct"],
        "checkpoint": str(run_dir / runfiles.BEST),
        "last_checkpoint": str(run_dir / runfiles.LAST),
        "train_images_per_s": round(run.progress.train_images / max(run.progress.train_time, 1e-9), 1),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    result["class_counts"] = dict(zip(run.data.classes, run.data.train_counts))
    if len(run.lineage.tasks) > 1 or run.lineage.parent or run.lineage.replay:
        result["tasks"] = final.get("test_tasks") or [
            {"task": i, "classes": t} for i, t in enumerate(run.lineage.tasks, 1)
        ]
        result["parent"] = run.lineage.parent
        result["replay"] = (
            dict(run.lineage.replay, file=str(run_dir / runfiles.REPLAY)) if run.memory is not None else None
        )
    result["resolved"] = resolved_settings(cfg, run)
    if run.data.imbalance:
        result["imbalance"] = run.data.imbalance
    crit = evaluated(run).criterion
    if crit.uses_anchors:
        result["loss_floor"] = crit.loss_floor()  # at the final scale
        result["scale"] = scale_record(cfg, crit)
    if world > 1:
        result["ddp"] = {
            "world_size": world,
            "params_identical_across_ranks": _same_on_all_ranks(run.model, run.criterion),
        }
    return result


def resolved_settings(cfg: Config, run: Setup) -> dict:
    """What the keys left to ncm became (a folder's image side and channels, an auto scale):
    reports and plot legends show these instead of 0 or auto."""
    c, h, _ = run.data.input_shape
    out = {}
    if cfg.data.name == "folder":
        out.update({"data.image_size": h, "data.channels": c})
    crit = run.criterion
    if crit.uses_anchors and cfg.loss.scale == "auto":
        out["loss.scale"] = f"auto={crit.initial_scale:.4g}"
    return out


def scale_record(cfg: Config, crit) -> dict:
    """What result.json says of an NCM loss's scale: the setting, the number it resolved to at
    the start, the final one (moved only by learn) and the floor at it."""

    value = crit.scale_value()
    floor = crit.loss_floor()  # at the current scale; with free slots, every slot in the denominator
    rec = {
        "setting": cfg.loss.scale,
        "initial": crit.initial_scale,
        "value": value,
        "floor": floor,
        "top_probability": top_probability(floor),
    }
    if isinstance(cfg.loss.scale, str):
        rec["floor_target"] = cfg.loss.floor_target
    return rec


def scale_comment(cfg: Config, crit) -> str:
    """config.yaml's note of what auto/learn resolved to (a comment: the config keeps the
    user's setting, and a checkpoint rebuilds from the anchors or its stored scale)."""
    if not crit.uses_anchors or not isinstance(cfg.loss.scale, str):
        return ""
    return (
        f"# loss.scale={cfg.loss.scale} resolved to {crit.scale_value():.6g} at the start "
        f"(loss floor {cfg.loss.floor_target:g} nats)\n"
    )


MIN_SELECT_VAL, WARN_VAL = 50, 200  # validation images: below these best is not chosen / may be noise


def selection(run: Setup) -> tuple[str, str]:
    """(the metric best.safetensors is chosen on, a warning or ""). On a validation split of
    fewer than 50 images one image moves the accuracy by more than 2 points, so best follows
    the last epoch instead; under 200 it is chosen, with a warning."""
    if run.val_split is None:
        return "test_acc", ""
    n = len(run.val_split)
    point = 100.0 / n
    if n < MIN_SELECT_VAL:
        return "epoch", (
            f"warning: the validation split has only {n} images (one is {point:.1f} points of accuracy): "
            f"too few to choose on, so best.safetensors follows the last epoch (raise data.val_split)"
        )
    if n < WARN_VAL:
        return "val_acc", (
            f"warning: the validation split has only {n} images (one is {point:.1f} points of accuracy): "
            "best.safetensors may be chosen by noise; compare with --which last"
        )
    return "val_acc", ""


def announce(cfg: Config, run: Setup, run_dir: Path, device, reporter) -> None:

    crit, data, world = run.criterion, run.data, dist_info()[1]
    if crit.uses_anchors:
        reporter.certificate(
            anchor_certificate(crit.anchors, cfg.anchors.method, crit.metric, crit.scale_value()).to_dict()
        )
        if isinstance(cfg.loss.scale, str):
            reporter.message(
                f"loss.scale={cfg.loss.scale}: s = {crit.scale_value():.4f}, the scale whose loss floor is "
                f"{cfg.loss.floor_target:g} nats"
                + ("; learned from there" if cfg.loss.scale == "learn" else "")
            )
    reporter.message(f"run folder: {run_dir}")
    for note in data.notes:
        reporter.message(note)
    reporter.message(
        f"data: {data.name}, {len(run.train_split)} train"
        + (f" / {len(run.val_split)} validation" if run.val_split is not None else "")
        + f" / {len(run.test_split)} test, {len(data.classes)} classes, input {data.input_shape}; "
        f"device: {device}"
        + (
            f"; DDP over {world} processes, {cfg.train.batch_size // world} images each per step"
            if world > 1
            else ""
        )
    )
    warning = selection(run)[1]
    if warning:
        reporter.message(warning)


def _same_on_all_ranks(model, criterion) -> bool:
    """A consistency check after DDP training: every rank holds the same weights."""
    tensors = [*model.parameters(), *criterion.parameters(), *model.buffers(), *criterion.buffers()]
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    lo, hi = flat.clone(), flat.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
