"""``ncm train --extend CKPT``: add classes to a trained model without moving the old ones.

The run starts from the parent checkpoint's weights, every one of its anchor slots and its
class map; each new class takes a free slot (``slots.assign_slots``), and a learned head
grows by one freshly initialised row per new class (``slots.grow_head``). Optimiser and
schedule start fresh. ``train.replay`` mixes the parent's memory into every epoch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ncmcli.config.overrides import dotted
from ncmcli.data import replay
from ncmcli.errors import ConfigError, UsageError
from ncmcli.runs import checkpoint, runfiles
from ncmcli.storage import atomic_write_text, bounded_json

# What must match the parent: the net, the anchors and the input format. The rest of the
# config (optimiser, schedule, epochs, data sampling, replay) is the new run's own.
MATCHED_KEYS = (
    "model.arch",
    "model.feature_dim",
    "model.head",
    "loss.name",
    "anchors.method",
    "anchors.seed",
    "anchors.slots",
    "data.normalization",
    "data.resize",
)


@dataclass
class Lineage:
    """Where a run's classes came from: the tasks so far (class names per run, the last one
    this run's) and, for an --extend run, its parent."""

    tasks: list[list[str]]
    parent: dict | None = None  # {"path", "sha256"} of the parent checkpoint
    replay: dict = field(default_factory=dict)  # result.json's record of the memories


@dataclass
class Parent:
    path: Path
    sha256: str
    checkpoint: object  # ncmcli.runs.checkpoint.Checkpoint, on the CPU
    tasks: list[list[str]]
    memory: replay.Memory | None

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.classes)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_parent(target: Path, *, expect_sha256: str | None = None) -> Parent:
    """The parent checkpoint (a file, or a run folder's best), its task history and, when its
    run kept one, its replay memory (replay.safetensors beside it)."""

    path = runfiles.resolve_checkpoint(Path(target), "best")
    digest = sha256_of(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise UsageError(
            f"the parent checkpoint {path} changed since this run started (sha256 {digest[:12]}..., "
            f"recorded {expect_sha256[:12]}...); an --extend run resumes only from its own parent"
        )
    ck = checkpoint.load(path, "cpu")
    memory_path = path.parent / runfiles.REPLAY
    memory = replay.load(memory_path, ck.input_shape) if memory_path.is_file() else None
    return Parent(path.resolve(), digest, ck, ck.tasks or [list(ck.classes)], memory)


def parent_of_run(run_dir: Path) -> Parent | None:
    """The parent an --extend run recorded in its folder (for --resume), or None."""
    record_path = run_dir / runfiles.PARENT
    if not record_path.is_file():
        return None
    try:
        record = bounded_json(record_path.read_text(encoding="utf-8"))
        return open_parent(Path(record["path"]), expect_sha256=str(record["sha256"]))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{record_path} is not a readable parent record") from None


def write_parent_record(run_dir: Path, parent: Parent) -> None:
    atomic_write_text(
        run_dir / runfiles.PARENT,
        json.dumps({"path": str(parent.path), "sha256": parent.sha256}, indent=2) + "\n",
    )


def check_compatible(cfg, parent: Parent) -> None:
    """Refuse, in one line, a run whose net, anchors or input format differ from the parent's."""

    mine, theirs = dotted(cfg.to_dict()), dotted(parent.checkpoint.config.to_dict())
    for key in MATCHED_KEYS:
        if mine[key] != theirs[key]:
            raise ConfigError(
                f"--extend: {key} is {str(theirs[key])[:40]} in {parent.path.name} and "
                f"{str(mine[key])[:40]} in this run; the net, the anchors and the input format "
                "must match the checkpoint"
            )


def check_input(parent: Parent, input_shape) -> None:
    if tuple(input_shape) != tuple(parent.checkpoint.input_shape):
        raise ConfigError(
            f"--extend: the data's input shape is {tuple(input_shape)}, the checkpoint's "
            f"{tuple(parent.checkpoint.input_shape)}; the input format must match"
        )


def extended_classifier(cfg, parent: Parent, classes: list[str], class_counts=None):
    """The parent's classifier with room for the new classes (``Classifier.extended``): NCM
    losses keep every slot bit-identical and give each new class a free slot; learned heads
    grow by fresh rows. A scale setting changed since the parent resolves anew."""
    old = parent.checkpoint.classifier
    keep_scale = cfg.loss.scale == parent.checkpoint.config.loss.scale
    try:
        return old.extended(cfg, classes, keep_scale=keep_scale, class_counts=class_counts)
    except ValueError as exc:
        if "free anchor slot" not in str(exc):
            raise ConfigError(f"--extend: {exc}") from None
        slots = len(old.criterion.slot_anchors if old.criterion.has_slots else old.criterion.anchors)
        raise ConfigError(
            f"--extend: no free anchor slot left ({exc}); train the first task with a larger "
            f"anchors.slots, e.g. --set anchors.slots={max(2 * slots, len(classes))}"
        ) from None


def mixed_memory(cfg, parent: Parent, classes: list[str]) -> replay.Memory | None:
    """The parent's memory, re-chosen to at most train.replay images balanced over the old
    classes, as labels of this run's ``classes``; None when train.replay is 0."""
    if not cfg.train.replay:
        return None
    if parent.memory is None:
        raise ConfigError(
            f"train.replay={cfg.train.replay} rehearses the parent's replay memory, but "
            f"{parent.path.parent} has no {runfiles.REPLAY}: train the parent with "
            f"--set train.replay={cfg.train.replay} too, or set train.replay=0"
        )
    memory = replay.relabel(parent.memory, classes)
    old = [classes.index(c) for c in parent.classes]
    return replay.select(
        memory.split(),
        classes,
        cfg.train.replay,
        seed=cfg.seed,
        among=old,
        from_parent=torch.ones(len(memory.labels), dtype=torch.bool),
    )


def task_accuracies(confusion, classes: list[str], tasks: list[list[str]]) -> list[dict]:
    """Accuracy on the test images of each task's classes (predictions over every class: the
    class-incremental score), from a confusion matrix (rows: true class)."""
    conf = torch.as_tensor(confusion, dtype=torch.float64)
    out = []
    for i, names in enumerate(tasks, 1):
        rows = [classes.index(n) for n in names if n in classes]
        total = conf[rows].sum().item()
        hits = conf[rows, rows].sum().item()
        out.append(
            {
                "task": i,
                "classes": list(names),
                "n": int(total),
                "accuracy": hits / total if total else None,
                "new": i == len(tasks),
            }
        )
    return out
