"""``train.replay``: a seeded, class-balanced memory of training images, kept in the run
folder as safetensors (never pickle) for later ``--extend`` runs to rehearse.

The memory holds at most N images, N // C of each of the C classes the model knows: the
new classes' from this run's training split, the old classes' from the parent's memory
(the only images of them an --extend run has). Hsu et al.'s naive rehearsal does the same."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ncmcli.data.batching import Split
from ncmcli.errors import DataError
from ncmcli.storage import CorruptFile, bounded_json, read_tensor_file, save_tensors

FORMAT = "ncm-replay"
MAX_IMAGES = 10_000_000


@dataclass
class Memory:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64, indices into classes
    classes: list[str]
    selection: dict  # what result.json records: budget, quota, per-class counts, seed, provenance

    def split(self) -> Split:
        return Split(self.images, self.labels)


def select(
    pool: Split,
    classes: list[str],
    budget: int,
    *,
    seed: int,
    from_parent=None,
    among: list[int] | None = None,
) -> Memory:
    """At most ``budget`` images of ``pool``: ``budget // len(among)`` of each class in
    ``among`` (default: every class), a seeded random choice within each class. ``from_parent``
    (N,) bool marks the pool images that came from the parent's memory (recorded only)."""
    among = list(range(len(classes))) if among is None else among
    quota = budget // max(len(among), 1)
    g = torch.Generator().manual_seed(int(seed) % 2**63 + 3)  # not the data order's draw
    labels = pool.labels.cpu()
    picked = []
    for c in among:
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:quota]])
    idx = torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.int64)
    images, chosen = pool.images.cpu()[idx], labels[idx]
    counts = torch.bincount(chosen, minlength=len(classes)).tolist()
    parent_n = 0 if from_parent is None else int(torch.as_tensor(from_parent).cpu()[idx].sum())
    selection = {
        "budget": int(budget),
        "per_class_quota": quota,
        "size": len(idx),
        "seed": int(seed),
        "per_class": {classes[c]: counts[c] for c in among},
        "from_parent_memory": parent_n,
    }
    return Memory(images.contiguous(), chosen.contiguous(), list(classes), selection)


def save(path: Path, memory: Memory) -> None:
    meta = {
        "format": FORMAT,
        "format_version": "1",
        "classes": json.dumps(memory.classes),
        "selection": json.dumps(memory.selection),
    }
    tensors = {"images": memory.images.contiguous(), "labels": memory.labels.contiguous()}
    save_tensors(Path(path), tensors, meta)


def load(path: Path, input_shape: tuple[int, int, int]) -> Memory:
    """A memory file, checked: ncm's format, uint8 images of ``input_shape``, labels that
    index its classes. Anything else is a one-line DataError."""
    path = Path(path)
    try:
        f = read_tensor_file(path)
        meta = f.meta
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: not an ncm replay memory (no format={FORMAT})")
        shapes = {k: tuple(v.get("shape", ())) for k, v in f.header.items() if isinstance(v, dict)}
        if (
            set(shapes) != {"images", "labels"}
            or len(shapes["images"]) != 4
            or shapes["images"][1:] != tuple(input_shape)
            or shapes["labels"] != shapes["images"][:1]
            or shapes["images"][0] > MAX_IMAGES
        ):
            raise DataError(
                f"{path}: a replay memory of {shapes.get('images')} images, the model takes "
                f"{tuple(input_shape)}"
            )
        tensors = f.tensors()
        images, labels = tensors["images"], tensors["labels"]
        classes = bounded_json(meta.get("classes", "null"))
        selection = bounded_json(meta.get("selection", "{}"))
    except DataError:
        raise
    except CorruptFile as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # SafetensorError, JSON errors, a truncated file
        raise DataError(
            f"{path}: unreadable replay memory ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
        ) from None
    if (
        images.dtype != torch.uint8
        or labels.dtype != torch.int64
        or not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
    ):
        raise DataError(f"{path}: a replay memory needs uint8 images, int64 labels and a list of class names")
    if len(labels) and not bool(((labels >= 0) & (labels < len(classes))).all()):
        raise DataError(f"{path}: replay labels fall outside its {len(classes)} classes")
    return Memory(images, labels, classes, selection if isinstance(selection, dict) else {})


def relabel(memory: Memory, classes: list[str]) -> Memory:
    """``memory`` with its labels as indices of ``classes`` (a child run's class list)."""
    missing = [c for c in memory.classes if c not in classes]
    if missing:
        raise DataError(f"the replay memory holds class {missing[0][:40]!r}, which the model does not know")
    remap = torch.tensor([classes.index(c) for c in memory.classes], dtype=torch.int64)
    return Memory(
        memory.images,
        remap[memory.labels] if len(memory.labels) else memory.labels,
        list(classes),
        dict(memory.selection),
    )
