"""Self-describing checkpoints: one safetensors file that rebuilds its model alone.

Tensors: ``model.*`` (the feature net), ``criterion.*`` (learnable criterion parameters),
and ``anchors`` (C, d) for NCM criteria. Metadata (JSON strings): format and version, the
ncmcli version, the resolved config, class names, normalisation, input shape, epoch and
metrics. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ncmcli import __version__
from ncmcli.config import overrides as ov
from ncmcli.config.schema import MAX_CLASSES, MAX_PARAMS  # the bounds training checks too
from ncmcli.errors import CheckpointError, NcmError
from ncmcli.nn.classifier import Classifier
from ncmcli.runs import validate
from ncmcli.runs.ckfile import FORMAT, FORMAT_VERSION, CheckpointFile
from ncmcli.storage import save_tensors

_ANCHOR_KEY = "anchors"


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
    path: Path,
    classifier,
    *,
    config,
    epoch,
    metrics,
    extra: tuple[dict, str] | None = None,
    run_id: str | None = None,
    class_counts: list[int] | None = None,
    imbalance: str = "",
    lineage=None,
) -> None:
    """Write ``classifier`` (a ``Classifier``) and the ``config`` that built it to ``path``,
    atomically. ``extra``: (tensors, train_state JSON) from ``trainstate.pack``, for resumable files.
    ``class_counts``: the training images per class (the prior of logit adjustment and of
    head/medium/tail metrics). ``lineage``: an ``incremental.Lineage`` (the tasks, the parent)."""
    model, criterion = classifier.net, classifier.criterion
    classes, mean, std, input_shape = (
        classifier.classes,
        classifier.mean,
        classifier.std,
        classifier.input_shape,
    )
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
    save_tensors(Path(path), tensors, meta)  # with the digest of its data, checked on every read


def load(path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the classifier from the file alone, strictly. ``path``: a file, or a
    ``CheckpointFile`` already read (a resume reads last.safetensors once for this and for
    ``trainstate.unpack``)."""
    file = path if isinstance(path, CheckpointFile) else CheckpointFile.read(path)
    path, meta = file.path, file.meta
    d = _describe(file)
    feature_dim = _check_sizes(d, file.shapes)  # on the meta device: before any memory is used
    tensors = file.tensors()
    anchors, slot_anchors, class_slots = _checked_anchors(d, tensors, feature_dim)
    try:
        classifier = _build(
            d,
            "cpu",
            anchors=anchors if slot_anchors is None else slot_anchors,
            class_slots=class_slots,
            scale=validate.stored_scale(meta, path),
            counts=d.counts,
        )
    except (ValueError, NcmError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the criterion ({exc})") from None
    _fill(path, classifier, tensors, anchors)
    classifier.to(device).eval()
    epoch_text = meta.get("epoch", "0")
    return Checkpoint(
        classifier=classifier,
        config=d.cfg,
        epoch=int(epoch_text) if epoch_text.isdigit() else 0,
        metrics=validate.meta_json(meta, "metrics", path) if "metrics" in meta else {},
        path=path,
        class_counts=d.counts,
        imbalance=str(meta.get("imbalance", ""))[:40],
        tasks=validate.tasks(meta, path, d.classes),
        parent=validate.meta_json(meta, "parent", path) if "parent" in meta else None,
    )


@dataclass
class _Described:
    """What a checkpoint's metadata says it holds, each part checked."""

    path: Path
    cfg: object
    classes: list
    shape: list
    mean: list
    std: list
    counts: list | None
    slot_shape: tuple | None  # pre-allocated anchors: (S, d)


def _describe(file: CheckpointFile) -> _Described:

    path, meta = file.path, file.meta
    try:
        cfg = ov.from_dict(validate.meta_json(meta, "config", path))
    except NcmError as exc:
        raise CheckpointError(f"{path}: invalid config in checkpoint ({exc})") from None
    classes, shape, mean, std, counts = validate.described_input(meta, path, cfg)
    slot_shape = file.shapes.get("criterion.slot_anchors")
    if slot_shape is not None and not (len(slot_shape) == 2 and len(classes) <= slot_shape[0] <= MAX_CLASSES):
        raise CheckpointError(
            f"{path}: criterion.slot_anchors has shape {list(slot_shape)}, not (slots >= classes, d)"
        )
    return _Described(path, cfg, classes, shape, mean, std, counts, slot_shape)


def _build(d: _Described, device, anchors=None, class_slots=None, scale=1.0, counts=None):
    """The classifier the config describes; without ``anchors``, placeholder ones of the file's
    shape (a template whose sizes are checked on the meta device)."""

    if anchors is None:
        anchors = d.slot_shape[0] if d.slot_shape is not None else len(d.classes)
        class_slots = torch.arange(len(d.classes)) if d.slot_shape is not None else None
    with torch.device(device):
        return Classifier.from_config(
            d.cfg,
            d.classes,
            d.shape,
            mean=d.mean,
            std=d.std,
            anchors=anchors,
            class_slots=class_slots,
            scale=scale,
            class_counts=counts,
            pretrained=False,
        )


def _check_sizes(d: _Described, header: dict) -> int:
    """Every tensor size the config implies against the file's header, and the parameter bound,
    on the meta device (no memory); the net's feature dimension."""
    path = d.path
    try:
        meta_model, meta_crit = _build(d, "meta", counts=[1] * len(d.classes)).parts()
    except (ValueError, NcmError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model ({exc})") from None
    expected = {f"model.{k}": tuple(v.shape) for k, v in meta_model.state_dict().items()}
    for k, v in meta_crit.state_dict().items():
        expected[_ANCHOR_KEY if k == _ANCHOR_KEY else f"criterion.{k}"] = tuple(v.shape)
    n_params = sum(math.prod(s) for s in expected.values())
    if n_params > MAX_PARAMS:
        raise CheckpointError(
            f"{path}: the config implies {n_params:,} parameters, above the {MAX_PARAMS:,} "
            "ncm loads; refusing before allocating"
        )
    stray = [k for k in header if k not in expected and not k.startswith("state.")]
    if stray:
        raise CheckpointError(f"{path}: unexpected tensors {stray[:3]}")
    for key, want in expected.items():
        if key in header and header[key] != want:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(header[key])}, the config implies {list(want)}"
            )
    state_numel = sum(math.prod(s) for k, s in header.items() if k.startswith("state."))
    if state_numel > 4 * n_params + 2**20:  # momentum buffers plus RNG states
        raise CheckpointError(
            f"{path}: its train state holds {state_numel:,} numbers, far more than the model needs"
        )
    return meta_model.feature_dim


def _checked_anchors(d: _Described, tensors: dict, feature_dim: int):
    """(anchors, slot anchors, class slots) from the tensors, after refusing any non-finite
    tensor and anchors that are not unit-norm, distinct and of the right shape."""
    path = d.path
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{path}: tensor {bad[0]} holds NaN or infinite values; the checkpoint is unusable"
        )
    anchors = tensors.get(_ANCHOR_KEY)
    if anchors is not None:
        validate.check_anchors(path, anchors)
    slot_anchors, class_slots = tensors.get("criterion.slot_anchors"), tensors.get("criterion.class_slots")
    if slot_anchors is not None:
        validate.check_slots(path, slot_anchors, class_slots, anchors)
    if anchors is not None and tuple(anchors.shape) != (len(d.classes), feature_dim):
        raise CheckpointError(
            f"{path}: anchors have shape {tuple(anchors.shape)}, expected ({len(d.classes)}, {feature_dim})"
        )
    return anchors, slot_anchors, class_slots


def _fill(path: Path, classifier, tensors: dict, anchors) -> None:
    """The file's weights into ``classifier``, strictly."""
    model, criterion = classifier.parts()
    model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    crit_sd = {k[len("criterion.") :]: v for k, v in tensors.items() if k.startswith("criterion.")}
    if anchors is not None:
        crit_sd[_ANCHOR_KEY] = anchors
    try:
        model.load_state_dict(model_sd, strict=True)
        criterion.load_state_dict(crit_sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: tensors do not match the model ({detail[:300]})") from None
