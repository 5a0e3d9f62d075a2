"""What a checkpoint must satisfy before ncm rebuilds anything from it: its described input
(classes, shape, normalisation, class counts), task history and stored scale, and anchors that
are unit-norm and distinct. Each failure is one CheckpointError naming the file."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ncmcli.config.schema import MAX_CLASSES, MAX_FEATURE_DIM, MAX_SCALE
from ncmcli.errors import CheckpointError
from ncmcli.nn.certificate import duplicate_pairs
from ncmcli.nn.slots import slot_table_problem, tasks_problem
from ncmcli.storage import bounded_json

# Bounds checked before anything is built or read: a crafted 100 KB file must not make ncm
# allocate gigabytes. The largest paper net (CIFAR-100, d=512) has about 10M parameters.
MAX_SIDE = 1024  # above data.image_size's 512: a checkpoint may come from elsewhere


def finite(x: float) -> bool:
    return math.isfinite(x)


def check_anchors(path: Path, anchors: torch.Tensor) -> None:
    """Anchors are unit-norm and distinct: refuse zero, scaled or duplicate rows."""

    norms = anchors.double().norm(dim=1)
    if not bool(((norms - 1).abs() < 1e-3).all()):
        i = int((norms - 1).abs().argmax())
        raise CheckpointError(
            f"{path}: anchor {i} has norm {norms[i].item():.4g}; anchors must have unit norm"
        )
    dups = duplicate_pairs(anchors) if len(anchors) <= 20_000 else []
    if dups:
        raise CheckpointError(
            f"{path}: anchors {dups[0][0]} and {dups[0][1]} coincide; each class needs its own"
        )


def described_input(meta: dict, path: Path, cfg) -> tuple[list, list, list, list, list | None]:
    """(classes, input shape, mean, std, class counts) from the metadata, each checked."""
    classes = meta_json(meta, "classes", path)
    norm = meta_json(meta, "normalization", path)
    shape = meta_json(meta, "input_shape", path)
    if not (
        isinstance(classes, list)
        and 2 <= len(classes) <= MAX_CLASSES
        and all(isinstance(c, str) for c in classes)
    ):
        raise CheckpointError(f"{path}: 'classes' must be a list of 2..{MAX_CLASSES} names")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and shape[0] in (1, 3)
        and all(isinstance(s, int) and 8 <= s <= 4096 for s in shape[1:])
    ):
        raise CheckpointError(f"{path}: 'input_shape' must be [1 or 3, H, W] with 8 <= H, W <= 4096")
    try:
        mean = [float(v) for v in norm["mean"]]
        std = [float(v) for v in norm["std"]]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: 'normalization' must hold mean and std lists") from None
    if len(mean) != shape[0] or len(std) != shape[0] or not all(s > 0 for s in std):
        raise CheckpointError(f"{path}: normalisation does not match {shape[0]} channels")
    if shape[1] != shape[2] or shape[1] > MAX_SIDE:
        raise CheckpointError(
            f"{path}: 'input_shape' must be square with a side of at most {MAX_SIDE}, got {shape}"
        )
    if not all(map(finite, mean)):
        raise CheckpointError(f"{path}: the normalisation mean is not finite")
    if cfg.model.feature_dim > MAX_FEATURE_DIM:
        raise CheckpointError(f"{path}: feature_dim {cfg.model.feature_dim} is above {MAX_FEATURE_DIM}")
    counts = meta_json(meta, "class_counts", path) if "class_counts" in meta else None
    if counts is not None and not (
        isinstance(counts, list)
        and len(counts) == len(classes)
        and all(isinstance(n, int) and 0 <= n < 2**40 for n in counts)
    ):
        raise CheckpointError(f"{path}: 'class_counts' must be a count per class")
    return classes, shape, mean, std, counts


def tasks(meta: dict, path: Path, classes: list[str]) -> list[list[str]] | None:
    """The checkpoint's task history: lists of its class names that together are its classes."""

    tasks = meta_json(meta, "tasks", path) if "tasks" in meta else None
    if tasks is not None and tasks_problem(tasks, classes):
        raise CheckpointError(f"{path}: 'tasks' {tasks_problem(tasks, classes)}")
    return tasks


def check_slots(path: Path, slot_anchors: torch.Tensor, class_slots, anchors) -> None:

    check_anchors(path, slot_anchors)  # every slot unit-norm and distinct
    problem = slot_table_problem(slot_anchors, class_slots, anchors)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def stored_scale(meta: dict, path: Path) -> float | None:
    """The NCM scale a checkpoint stored (the number auto/learn resolved to), or None."""
    if "scale" not in meta:
        return None
    try:
        value = float(meta["scale"])
    except ValueError:
        raise CheckpointError(f"{path}: checkpoint metadata 'scale' is not a number") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise CheckpointError(f"{path}: checkpoint scale {meta['scale'][:20]} is not in (0, {MAX_SCALE:g}]")
    return value


def meta_json(meta: dict, key: str, path: Path):
    try:
        return bounded_json(meta[key])
    except KeyError:
        raise CheckpointError(f"{path}: checkpoint metadata lacks '{key}'") from None
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{path}: not a valid ncm checkpoint (metadata '{key}' is not valid JSON, or nested too deeply)"
        ) from None
