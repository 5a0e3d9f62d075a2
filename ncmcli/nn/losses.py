"""The paper's loss and the SoftMax baseline, each a ``Criterion`` (``nn.criterion``):

- ``NCMLoss``: the paper's loss, p(c|x) = softmax_c(-scale * M(f(x), a_c)) over fixed anchors.
- ``SoftmaxLoss``: the SoftMax baseline, a Linear(d, C) head plus cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ncmcli import registry
from ncmcli.nn.criterion import Criterion, fp32, logit_bias
from ncmcli.nn.distances import DISTANCES, get_distance
from ncmcli.nn.floors import loss_floor, scale_for_floor, slot_floor


class NCMLoss(Criterion):
    """Anchor-based Nearest Class Mean loss (E-NCM with ``euclidean``, C-NCM with ``cosine``).

    ``distance`` (or ``metric``) is a registered name (``ncmcli.nn.distances.DISTANCES``) or any
    callable (features (B, D), anchors (C, D)) -> (B, C), injected as pytorch-metric-learning's
    losses take a distance object; the loss never branches on which one it holds.

    ``scale`` s is an inverse temperature on the distances. The paper has none (1.0): with
    unit anchors its softmax is flat, so the loss has a floor well above zero (see
    ``floors.loss_floor``); a larger scale lowers it (``floors.scale_for_floor`` picks the s
    of a given floor). ``learn_scale`` makes log s a parameter that starts at ``scale``, so
    s stays positive; the anchors never train either way.

    ``logit_bias`` (C,), when given, is added to the logits in the loss only: Menon et al.'s
    logit-adjusted loss, tau * log(prior). Prediction stays the nearest anchor."""

    uses_anchors = True
    FREE_SLOTS = ("softmax", "masked")

    def __init__(
        self,
        anchors: torch.Tensor,
        metric: str = "euclidean",
        scale: float = 1.0,
        *,
        learn_scale: bool = False,
        logit_bias: torch.Tensor | None = None,
        class_slots: torch.Tensor | None = None,
        free_slots: str = "softmax",
        distance=None,
    ):
        super().__init__()
        if anchors.ndim != 2 or anchors.shape[0] < 2:
            raise ValueError(f"anchors must be (C >= 2, D), got {tuple(anchors.shape)}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        if free_slots not in self.FREE_SLOTS:
            raise ValueError(f"free_slots must be one of {', '.join(self.FREE_SLOTS)}, got {free_slots!r}")
        if distance is not None and not isinstance(distance, str) and not callable(distance):
            raise TypeError(
                f"distance must be a registered name or a callable (features, anchors) -> (B, C), "
                f"got {type(distance).__name__}"
            )
        if callable(distance):  # an injected distance: (B, D), (C, D) -> (B, C)
            self.metric, self.distance = getattr(distance, "__name__", "custom"), distance
        else:
            self.metric = distance if isinstance(distance, str) else metric
            self.distance = get_distance(self.metric)
        self.learn_scale = bool(learn_scale)
        self.initial_scale = float(scale)  # fixed: a plain float, so scale 1 multiplies exactly
        if self.learn_scale:  # log s: positive whatever the optimiser does
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        # Pre-allocated slots: ``anchors`` holds every slot, ``class_slots`` (C,) the slot of each
        # class; the rows in use become ``self.anchors`` (class order), the rest wait.
        self.free_slots = free_slots
        self.has_slots = class_slots is not None
        used = anchors
        if self.has_slots:
            # on the CPU even while a checkpoint is sized on the meta device: its values are read
            class_slots = (
                torch.as_tensor(class_slots, dtype=torch.int64, device="cpu").detach().clone().flatten()
            )
            if (
                len(class_slots) < 2
                or len(set(class_slots.tolist())) != len(class_slots)
                or not bool(((class_slots >= 0) & (class_slots < len(anchors))).all())
            ):
                raise ValueError(f"class_slots must be >= 2 distinct slots of the {len(anchors)} anchors")
            self.register_buffer("slot_anchors", anchors.detach().clone().float())
            self.register_buffer("class_slots", class_slots)
            used = anchors[class_slots.to(anchors.device)]
        # A buffer, not a parameter: saved in state_dict, moved by .to(), never trained.
        self.register_buffer("anchors", used.detach().clone().float())
        self.set_logit_bias(logit_bias, self.anchors.shape[0])

    @property
    def num_classes(self) -> int:
        return self.anchors.shape[0]

    @property
    def scale(self) -> torch.Tensor | float:
        """s: a 0-d tensor when learned (gradients flow to log s), else a float."""
        return self.log_scale.exp() if self.learn_scale else self.initial_scale

    def scale_value(self) -> float:
        """s as a number (a host read when learned: for logs and files, never in the step)."""
        return float(self.log_scale.detach().exp().item()) if self.learn_scale else self.initial_scale

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        features = fp32(features)  # (B, D)
        return self.distance(features, self.anchors.to(features.dtype))  # (B, C)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.distances(features))  # (B, C)

    def logits_of(self, distances: torch.Tensor) -> torch.Tensor:
        """The paper's logits -s * M(f, a_c) from (B, C) distances already computed."""
        return -self.scale * distances

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if (
            not self.has_slots
            or self.free_slots == "masked"
            or len(self.class_slots) == len(self.slot_anchors)
        ):
            return super().forward(features, targets)
        # Free slots in the denominator: the softmax runs over every slot, and a class's
        # target is its slot (Pernici et al.: unused outputs see negatives from the start).
        f = fp32(features)
        every = -self.scale * self.distance(f, self.slot_anchors.to(f.dtype))  # (B, S)
        return F.cross_entropy(every, self.class_slots[targets])

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.distances(features).argmin(1)  # the nearest anchor in use: never a free slot

    def class_vectors(self) -> tuple[torch.Tensor, str]:
        return self.anchors.detach(), "anchors"

    def loss_floor(self) -> float:
        """The floor at the current scale (a learned scale moves it); with free slots in the
        softmax, the floor of the classes in use with every slot in the denominator."""

        if self.metric not in DISTANCES:  # an injected distance: every feature on its anchor
            a = self.anchors.detach().double()
            return F.cross_entropy(-self.scale_value() * self.distance(a, a), torch.arange(len(a))).item()
        if self.has_slots and self.free_slots == "softmax":
            return slot_floor(self.slot_anchors, self.class_slots, self.metric, self.scale_value())
        return loss_floor(self.anchors, self.metric, self.scale_value())

    def extra_repr(self) -> str:
        c, d = self.anchors.shape
        slots = f", slots={len(self.slot_anchors)} (free: {self.free_slots})" if self.has_slots else ""
        return (
            f"metric={self.metric}, scale={self.scale_value():.4g}{' (learned)' if self.learn_scale else ''}, "
            f"classes={c}, dim={d}{slots}"
        )


class SoftmaxLoss(Criterion):
    """The SoftMax baseline: Linear(d, C) + cross-entropy. For d = 2 this is the paper's
    extra FC layer with C outputs on top of the 2-D feature."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        label_smoothing: float = 0.0,
        *,
        logit_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.label_smoothing = float(label_smoothing)  # an extension: 0 is the paper's SoftMax
        self.set_logit_bias(logit_bias, num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(fp32(features))  # (B, C)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            self.adjusted(self.logits(features)), targets, label_smoothing=self.label_smoothing
        )


NCM_METRICS = registry.NCM_LOSSES  # loss name -> distance, for the losses with anchors
assert set(NCM_METRICS.values()) <= set(DISTANCES)


def resolve_scale(scale: float | str, floor_target: float, anchors: torch.Tensor, metric: str) -> float:
    """The number a ``loss.scale`` stands for: itself, or for auto/learn the scale at which the
    loss floor of ``anchors`` equals ``floor_target`` nats."""

    if not isinstance(scale, str):
        return float(scale)
    try:
        return scale_for_floor(anchors, metric, floor_target)
    except ValueError as exc:
        raise ValueError(f"loss.scale={scale}: {exc}") from None


def build_ncm(
    loss_cfg,
    *,
    anchors: torch.Tensor | None,
    dim: int,
    num_classes: int,
    prior: torch.Tensor | None = None,
    scale: float | None = None,
    class_slots: torch.Tensor | None = None,
) -> NCMLoss:
    """``scale``: the resolved number when known (a checkpoint stores it), else resolved here.
    ``class_slots``: with pre-allocated anchors, ``anchors`` holds every slot (S, dim) and this
    (num_classes,) the slot of each class; auto then reads the geometry of every slot."""
    rows = num_classes if class_slots is None else len(anchors) if anchors is not None else -1
    if anchors is None or anchors.ndim != 2 or anchors.shape[1] != dim or len(anchors) != rows:
        raise ValueError(
            f"{loss_cfg.name} needs anchors of shape ({num_classes}, {dim})"
            + (" or (slots, dim) with class_slots" if class_slots is not None else "")
        )
    if class_slots is not None and len(class_slots) != num_classes:
        raise ValueError(f"class_slots must give a slot for each of the {num_classes} classes")
    metric = NCM_METRICS[loss_cfg.name]
    if scale is None:
        masked = class_slots is not None and loss_cfg.free_slots == "masked"
        geometry = anchors[class_slots] if masked else anchors
        scale = resolve_scale(loss_cfg.scale, loss_cfg.floor_target, geometry, metric)
    return NCMLoss(
        anchors,
        metric=metric,
        scale=scale,
        learn_scale=loss_cfg.scale == "learn",
        logit_bias=logit_bias(loss_cfg.logit_adjust, prior, num_classes),
        class_slots=class_slots,
        free_slots=loss_cfg.free_slots,
    )


def build_softmax(loss_cfg, *, anchors=None, dim: int, num_classes: int, prior=None) -> SoftmaxLoss:
    return SoftmaxLoss(
        dim,
        num_classes,
        label_smoothing=loss_cfg.label_smoothing,
        logit_bias=logit_bias(loss_cfg.logit_adjust, prior, num_classes),
    )
