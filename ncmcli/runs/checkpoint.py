"""Self-describing checkpoints: one safetensors file that rebuilds its model alone.

Tensors: ``model.*`` (the feature net), ``criterion.*`` (learnable criterion parameters),
and ``anchors`` (C, d) for NCM criteria. Metadata (JSON strings): format and version, the
ncmcli version, the resolved config, class names, normalisation, input shape, epoch and
metrics. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ncmcli.config.schema import MAX_CLASSES, MAX_FEATURE_DIM, MAX_PARAMS, MAX_SCALE  # the bounds training checks too
from ncmcli.errors import CheckpointError, NcmError, special_file
from ncmcli.storage import atomic_write, bounded_json

FORMAT = "ncm-checkpoint"
FORMAT_VERSION = 1
_ANCHOR_KEY = "anchors"
# Bounds checked before anything is built or read: a crafted 100 KB file must not make ncm
# allocate gigabytes. The largest paper net (CIFAR-100, d=512) has about 10M parameters.
MAX_SIDE = 1024  # above data.image_size's 512: a checkpoint may come from elsewhere


@dataclass
class Checkpoint:
    """A loaded file: its ``Classifier`` (net, criterion, classes, input format), the config
    that built it, and what the run recorded."""

    classifier: object  # ncmcli.nn.classifier.Classifier, in eval mode
    config: object  # ncmcli.config.schema.Config
    epoch: int
    metrics: dict
    path: Path
    class_counts: list[int] | None = None  # training images per class, when the trainer knew them
    imbalance: str = ""  # the data.imbalance profile the counts come from ("" = as the data came)
    tasks: list[list[str]] | None = None  # class-incremental: the classes each run added, in order
    parent: dict | None = None  # an --extend run's parent checkpoint: {"path", "sha256"}

    # The classifier's parts, for reading.
    model = property(lambda self: self.classifier.net)
    criterion = property(lambda self: self.classifier.criterion)
    classes = property(lambda self: self.classifier.classes)
    mean = property(lambda self: self.classifier.mean)
    std = property(lambda self: self.classifier.std)
    input_shape = property(lambda self: self.classifier.input_shape)


def save(
    path: Path, classifier, *, config, epoch, metrics, extra: tuple[dict, str] | None = None,
    run_id: str | None = None, class_counts: list[int] | None = None, imbalance: str = "", lineage=None,
) -> None:
    """Write ``classifier`` (a ``Classifier``) and the ``config`` that built it to ``path``,
    atomically. ``extra``: (tensors, train_state JSON) from ``trainstate.pack``, for resumable files.
    ``class_counts``: the training images per class (the prior of logit adjustment and of
    head/medium/tail metrics). ``lineage``: an ``incremental.Lineage`` (the tasks, the parent)."""
    from safetensors.torch import save_file

    from ncmcli import __version__

    model, criterion = classifier.net, classifier.criterion
    classes, mean, std, input_shape = classifier.classes, classifier.mean, classifier.std, classifier.input_shape
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for k, v in criterion.state_dict().items():
        tensors[_ANCHOR_KEY if k == _ANCHOR_KEY else f"criterion.{k}"] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "ncmcli_version": __version__,
        "config": json.dumps(config.to_dict()),
        "classes": json.dumps(list(classes)),
        "normalization": json.dumps({"mean": list(mean), "std": list(std)}),
        "input_shape": json.dumps(list(input_shape)),
        "epoch": str(int(epoch)),
        "metrics": json.dumps(metrics),
    }
    if run_id:
        meta["run_id"] = run_id
    if getattr(criterion, "uses_anchors", False):
        meta["scale"] = repr(criterion.scale_value())  # what auto/learn resolved to, exactly
    if class_counts is not None:
        meta["class_counts"] = json.dumps([int(n) for n in class_counts])
        meta["imbalance"] = imbalance
    if lineage is not None:
        meta["tasks"] = json.dumps(lineage.tasks)
        if lineage.parent:
            meta["parent"] = json.dumps(lineage.parent)
    if extra is not None:
        tensors.update({k: v.detach().to("cpu").contiguous() for k, v in extra[0].items()})
        meta["train_state"] = extra[1]
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _meta_json(meta: dict, key: str, path: Path):
    try:
        return bounded_json(meta[key])
    except KeyError:
        raise CheckpointError(f"{path}: checkpoint metadata lacks '{key}'") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: not a valid ncm checkpoint (metadata '{key}' is not valid JSON, "
                              "or nested too deeply)") from None


def read_metadata(path: Path) -> dict:
    """The metadata of a safetensors file (its header alone), refusing anything that is not an
    ncm checkpoint."""
    from safetensors import safe_open

    path = _existing_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # SafetensorError: truncated, empty, random bytes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None
    _check_format(path, meta)
    return meta


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on its JSON header


@dataclass
class CheckpointFile:
    """One read of a checkpoint file: its metadata, its tensors' shapes (from the header) and its
    bytes, decoded into tensors on demand, once. ``load`` and ``trainstate.unpack`` both take one,
    so a resume reads last.safetensors from disk once."""

    path: Path
    meta: dict
    shapes: dict
    _data: bytes | None = field(default=None, repr=False)
    _tensors: dict | None = field(default=None, repr=False)

    @classmethod
    def read(cls, path) -> "CheckpointFile":
        path = _existing_file(Path(path))
        with open(path, "rb") as fh:
            data = fh.read()
        meta, shapes = _parse_header(path, data)
        _check_format(path, meta)
        return cls(path, meta, shapes, data)

    def tensors(self) -> dict:
        """Every tensor of the file (on the CPU), decoded once; the raw bytes are then dropped."""
        if self._tensors is None:
            from safetensors.torch import load as load_bytes

            try:
                self._tensors = load_bytes(self._data)
            except Exception as exc:
                raise CheckpointError(f"{self.path}: cannot read tensors ({str(exc).splitlines()[0]})") from None
            self._data = None
        return self._tensors

    def release(self) -> None:
        """Drop the bytes and tensors (a resume holds the file only until it has restored)."""
        self._data = self._tensors = None


def _existing_file(path: Path) -> Path:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        kind = special_file(path)
        raise CheckpointError(f"{path} is {kind}, not a checkpoint file; refusing to open it" if kind
                              else f"checkpoint not found: {path}")
    return path


def _parse_header(path: Path, data: bytes) -> tuple[dict, dict]:
    """(metadata, tensor shapes) from a safetensors file's bytes: an 8-byte little-endian length,
    then that many bytes of JSON."""
    def bad(why: str):
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise bad(f"its header claims {n} bytes, more than the file holds")
    try:
        header = bounded_json(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("its metadata is not a map of strings")
    shapes = {}
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: unreadable tensor header (tensor {key[:40]!r} has no valid shape)")
        shapes[key] = tuple(shape)
    return meta, shapes


def _check_format(path: Path, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not an ncm checkpoint (no format={FORMAT})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(this ncm reads version {FORMAT_VERSION})"
        )


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _check_anchors(path: Path, anchors: torch.Tensor) -> None:
    """Anchors are unit-norm and distinct: refuse zero, scaled or duplicate rows."""
    from ncmcli.nn.anchors import duplicate_pairs

    norms = anchors.double().norm(dim=1)
    if not bool(((norms - 1).abs() < 1e-3).all()):
        i = int((norms - 1).abs().argmax())
        raise CheckpointError(f"{path}: anchor {i} has norm {norms[i].item():.4g}; anchors must have unit norm")
    dups = duplicate_pairs(anchors) if len(anchors) <= 20_000 else []
    if dups:
        raise CheckpointError(f"{path}: anchors {dups[0][0]} and {dups[0][1]} coincide; each class needs its own")


def load(path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the classifier from the file alone, strictly. ``path``: a file, or a
    ``CheckpointFile`` already read (a resume reads last.safetensors once for this and for
    ``trainstate.unpack``)."""
    from ncmcli.config import overrides as ov
    from ncmcli.nn.classifier import Classifier

    file = path if isinstance(path, CheckpointFile) else CheckpointFile.read(path)
    path, meta, header = file.path, file.meta, file.shapes
    try:
        cfg = ov.from_dict(_meta_json(meta, "config", path))
    except NcmError as exc:
        raise CheckpointError(f"{path}: invalid config in checkpoint ({exc})") from None
    classes, shape, mean, std, counts = _described_input(meta, path, cfg)
    stored_scale = _stored_scale(meta, path)
    tasks = _tasks(meta, path, classes)
    slot_shape = header.get("criterion.slot_anchors")  # pre-allocated anchors: (S, d)
    if slot_shape is not None and not (len(slot_shape) == 2 and len(classes) <= slot_shape[0] <= MAX_CLASSES):
        raise CheckpointError(f"{path}: criterion.slot_anchors has shape {list(slot_shape)}, not (slots >= classes, d)")
    placeholder_prior = [1] * len(classes)
    placeholder_slots = torch.arange(len(classes)) if slot_shape is not None else None

    def build(device, anchors=None, class_slots=None, scale=1.0, counts=counts):
        """The classifier the config describes; without ``anchors``, placeholder ones of the
        file's shape (on the meta device: every size checked before any memory is used)."""
        if anchors is None:
            anchors = slot_shape[0] if slot_shape is not None else len(classes)
            class_slots = placeholder_slots
        with torch.device(device):
            return Classifier.from_config(cfg, classes, shape, mean=mean, std=std, anchors=anchors,
                                          class_slots=class_slots, scale=scale, class_counts=counts, pretrained=False)

    # -- Validate every size on the meta device (no memory) against the file's header
    try:
        meta_model, meta_crit = build("meta", counts=placeholder_prior).parts()
    except (ValueError, NcmError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model ({exc})") from None
    expected = {f"model.{k}": tuple(v.shape) for k, v in meta_model.state_dict().items()}
    for k, v in meta_crit.state_dict().items():
        expected[_ANCHOR_KEY if k == _ANCHOR_KEY else f"criterion.{k}"] = tuple(v.shape)
    n_params = sum(math.prod(s) for s in expected.values())
    if n_params > MAX_PARAMS:
        raise CheckpointError(f"{path}: the config implies {n_params:,} parameters, above the {MAX_PARAMS:,} "
                              "ncm loads; refusing before allocating")
    stray = [k for k in header if k not in expected and not k.startswith("state.")]
    if stray:
        raise CheckpointError(f"{path}: unexpected tensors {stray[:3]}")
    for key, want in expected.items():
        if key in header and header[key] != want:
            raise CheckpointError(f"{path}: tensor {key} has shape {list(header[key])}, the config implies {list(want)}")
    state_numel = sum(math.prod(s) for k, s in header.items() if k.startswith("state."))
    if state_numel > 4 * n_params + 2**20:  # momentum buffers plus RNG states
        raise CheckpointError(f"{path}: its train state holds {state_numel:,} numbers, far more than the model needs")
    tensors = file.tensors()
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: tensor {bad[0]} holds NaN or infinite values; the checkpoint is unusable")
    anchors = tensors.get(_ANCHOR_KEY)
    if anchors is not None:
        _check_anchors(path, anchors)
    slot_anchors, class_slots = tensors.get("criterion.slot_anchors"), tensors.get("criterion.class_slots")
    if slot_anchors is not None:
        _check_slots(path, slot_anchors, class_slots, anchors)
    if anchors is not None and tuple(anchors.shape) != (len(classes), meta_model.feature_dim):
        raise CheckpointError(
            f"{path}: anchors have shape {tuple(anchors.shape)}, expected ({len(classes)}, {meta_model.feature_dim})"
        )
    try:
        classifier = build("cpu", anchors=anchors if slot_anchors is None else slot_anchors, class_slots=class_slots,
                           scale=stored_scale)
    except (ValueError, NcmError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the criterion ({exc})") from None
    model, criterion = classifier.parts()
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    crit_sd = {k[len("criterion."):]: v for k, v in tensors.items() if k.startswith("criterion.")}
    if anchors is not None:
        crit_sd[_ANCHOR_KEY] = anchors
    try:
        model.load_state_dict(model_sd, strict=True)
        criterion.load_state_dict(crit_sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: tensors do not match the model ({detail[:300]})") from None
    classifier.to(device).eval()
    epoch_text = meta.get("epoch", "0")
    return Checkpoint(
        classifier=classifier, config=cfg, epoch=int(epoch_text) if epoch_text.isdigit() else 0,
        metrics=_meta_json(meta, "metrics", path) if "metrics" in meta else {}, path=path,
        class_counts=counts, imbalance=str(meta.get("imbalance", ""))[:40], tasks=tasks,
        parent=_meta_json(meta, "parent", path) if "parent" in meta else None,
    )


def _described_input(meta: dict, path: Path, cfg) -> tuple[list, list, list, list, list | None]:
    """(classes, input shape, mean, std, class counts) from the metadata, each checked."""
    classes = _meta_json(meta, "classes", path)
    norm = _meta_json(meta, "normalization", path)
    shape = _meta_json(meta, "input_shape", path)
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: 'classes' must be a list of 2..{MAX_CLASSES} names")
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] in (1, 3)
            and all(isinstance(s, int) and 8 <= s <= 4096 for s in shape[1:])):
        raise CheckpointError(f"{path}: 'input_shape' must be [1 or 3, H, W] with 8 <= H, W <= 4096")
    try:
        mean = [float(v) for v in norm["mean"]]
        std = [float(v) for v in norm["std"]]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: 'normalization' must hold mean and std lists") from None
    if len(mean) != shape[0] or len(std) != shape[0] or not all(s > 0 for s in std):
        raise CheckpointError(f"{path}: normalisation does not match {shape[0]} channels")
    if shape[1] != shape[2] or shape[1] > MAX_SIDE:
        raise CheckpointError(f"{path}: 'input_shape' must be square with a side of at most {MAX_SIDE}, got {shape}")
    if not all(map(_finite, mean)):
        raise CheckpointError(f"{path}: the normalisation mean is not finite")
    if cfg.model.feature_dim > MAX_FEATURE_DIM:
        raise CheckpointError(f"{path}: feature_dim {cfg.model.feature_dim} is above {MAX_FEATURE_DIM}")
    counts = _meta_json(meta, "class_counts", path) if "class_counts" in meta else None
    if counts is not None and not (isinstance(counts, list) and len(counts) == len(classes)
                                   and all(isinstance(n, int) and 0 <= n < 2**40 for n in counts)):
        raise CheckpointError(f"{path}: 'class_counts' must be a count per class")
    return classes, shape, mean, std, counts


def _tasks(meta: dict, path: Path, classes: list[str]) -> list[list[str]] | None:
    """The checkpoint's task history: lists of its class names that together are its classes."""
    from ncmcli.nn.slots import tasks_problem

    tasks = _meta_json(meta, "tasks", path) if "tasks" in meta else None
    if tasks is not None and tasks_problem(tasks, classes):
        raise CheckpointError(f"{path}: 'tasks' {tasks_problem(tasks, classes)}")
    return tasks


def _check_slots(path: Path, slot_anchors: torch.Tensor, class_slots, anchors) -> None:
    from ncmcli.nn.slots import slot_table_problem

    _check_anchors(path, slot_anchors)  # every slot unit-norm and distinct
    problem = slot_table_problem(slot_anchors, class_slots, anchors)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def _stored_scale(meta: dict, path: Path) -> float | None:
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
