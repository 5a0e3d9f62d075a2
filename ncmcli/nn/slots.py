"""Class-incremental heads: which pre-allocated anchor a new class takes, and how a learned
head grows by one row per new class. Torch only: no config, data or run folder here."""

from __future__ import annotations

import torch
from torch import nn


def assign_slots(slot_anchors: torch.Tensor, used: list[int], count: int) -> list[int]:
    """``count`` free slots for new classes, one at a time: each takes the free slot whose
    nearest used anchor is farthest away (ties: the lower index); with none used, slot 0.
    For equiangular anchors (orthonormal, simplex) every free slot ties, so classes take
    slots in order; for others the new class lands where the old ones crowd it least."""
    a = slot_anchors.detach().double().cpu()
    taken = list(used)
    free = [i for i in range(len(a)) if i not in set(taken)]
    if count > len(free):
        raise ValueError(
            f"{count} new classes need {count} free anchor slots, and {len(free)} of the {len(a)} are free"
        )
    picked = []
    for _ in range(count):
        if not taken:
            choice = free[0]
        else:
            gaps = torch.cdist(a[free], a[taken]).min(1).values  # (free,) distance to the nearest used
            best = gaps.max()
            choice = free[int((gaps >= best - 1e-9).nonzero()[0])]  # the first of the ties
        picked.append(choice)
        taken.append(choice)
        free.remove(choice)
    return picked


CLASS_ROW_BUFFERS_RESET = ("iteration",)  # L-Softmax's annealing step: a schedule, which starts fresh


def grow_head(parent: nn.Module, child: nn.Module, old_classes: int) -> list[str]:
    """Copy a learned head's state from ``parent`` (``old_classes`` classes) into ``child``
    (more classes, freshly initialised): tensors of the same shape are copied whole, tensors
    with one row per class keep their old rows and leave the new rows as initialised (the
    expanding-classifier baseline). Returns the names of the tensors that grew."""
    theirs = parent.state_dict()
    grown = []
    with torch.no_grad():
        for name, mine in child.state_dict().items():
            old = theirs.get(name)
            if old is None or name.split(".")[-1] in CLASS_ROW_BUFFERS_RESET:
                continue
            if old.shape == mine.shape:
                mine.copy_(old)
            elif old.ndim == mine.ndim and old.shape[0] == old_classes and old.shape[1:] == mine.shape[1:]:
                mine[:old_classes].copy_(old)
                grown.append(name)
            else:
                raise ValueError(
                    f"the head's {name} has shape {tuple(old.shape)} in the checkpoint and "
                    f"{tuple(mine.shape)} here"
                )
    return grown


def slot_table_problem(slot_anchors: torch.Tensor, class_slots, anchors) -> str:
    """What is wrong with a checkpoint's slot table ("" if nothing): one distinct slot per
    class, and the class anchors exactly those slots' rows."""
    if (
        class_slots is None
        or class_slots.dtype != torch.int64
        or anchors is None
        or len(class_slots) != len(anchors)
        or len(set(class_slots.tolist())) != len(class_slots)
        or not bool(((class_slots >= 0) & (class_slots < len(slot_anchors))).all())
    ):
        return f"criterion.class_slots must give each class its own slot of the {len(slot_anchors)} anchors"
    if not torch.equal(slot_anchors[class_slots], anchors):
        return "the class anchors are not the rows of their slots"
    return ""


def tasks_problem(tasks, classes: list[str]) -> str:
    """What is wrong with a task history ("" if nothing): lists of class names that, in order,
    are the model's classes."""
    if not (
        isinstance(tasks, list)
        and all(isinstance(t, list) and all(isinstance(c, str) for c in t) for t in tasks)
        and [c for t in tasks for c in t] == list(classes)
    ):
        return "must split the checkpoint's classes into lists, in order"
    return ""
