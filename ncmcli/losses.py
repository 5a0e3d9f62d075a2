"""Criteria: every one maps features to logits, features + targets to a loss, and
features to a prediction. Training, evaluation and checkpoints treat them all alike.

- ``NCMLoss``: the paper's loss, p(c|x) = softmax_c(-scale * M(f(x), a_c)) over fixed anchors.
- ``SoftmaxLoss``: the SoftMax baseline, a Linear(d, C) head plus cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ncmcli import registry
from ncmcli.distances import DISTANCES, get_distance
from ncmcli.errors import ConfigError


class Criterion(nn.Module):
    """The interface every criterion implements; training, evaluation, plots and checkpoints
    use nothing else. Learnable parameters (if any) are ordinary module parameters.

    - ``logits(f)``: (B, D) features -> (B, C) scores; ``forward(f, y)``: the mean loss;
      ``predict(f)``: (B,) classes.
    - ``uses_anchors``, ``anchors`` ((C, D) buffer or None), ``metric`` (the distance name or
      None) and ``distances(f)`` ((B, C); only for anchor models).
    - ``class_vectors()``: ((C, D) vectors, what they are) to draw and measure against: the
      anchors of an NCM model, the class weight rows of a linear head; (None, "") if neither.
    - ``loss_floor()``: the lowest mean loss reachable (the plateau rule's reference).
    """

    #: Whether ``logits`` is ``-scale * distance`` to fixed anchors (nearest-anchor models).
    uses_anchors = False
    metric: str | None = None

    def __init__(self):
        super().__init__()
        # None for heads without anchors; NCMLoss registers the (C, D) anchors here.
        self.register_buffer("anchors", None, persistent=False)

    def logits(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        raise NotImplementedError

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features), targets)

    def predict(self, features: torch.Tensor) -> torch.Tensor:  # (B,)
        return self.logits(features).argmax(1)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no anchors to measure distances to")

    def class_vectors(self) -> tuple[torch.Tensor | None, str]:
        fc = getattr(self, "fc", None)  # the linear heads (SoftMax, Hinge, Center) name it fc
        if isinstance(fc, nn.Linear):
            return fc.weight.detach(), "class weight vectors"
        return None, ""

    def loss_floor(self) -> float:
        """The lowest mean loss this criterion can reach: 0 for heads that can scale their
        logits freely; above 0 for NCM losses with fixed unit anchors. The plateau rule
        measures progress on the excess over it."""
        return 0.0


def fp32(x: torch.Tensor) -> torch.Tensor:
    # Distances and losses run in at least float32 even under bf16/fp16 autocast; float64
    # stays float64 so the reference tests see full precision.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class NCMLoss(Criterion):
    """Anchor-based Nearest Class Mean loss (E-NCM with ``euclidean``, C-NCM with ``cosine``).

    ``scale`` is an inverse temperature on the distances. The paper has none (1.0): with
    unit anchors its softmax is flat, so the loss has a floor well above zero (see
    ``floors.loss_floor``); a larger scale lowers it. It is an extension, off by default.
    """

    uses_anchors = True

    def __init__(self, anchors: torch.Tensor, metric: str = "euclidean", scale: float = 1.0):
        super().__init__()
        if anchors.ndim != 2 or anchors.shape[0] < 2:
            raise ConfigError(f"anchors must be (C >= 2, D), got {tuple(anchors.shape)}")
        if not scale > 0:
            raise ConfigError(f"scale must be > 0, got {scale}")
        self.metric = metric
        self.scale = float(scale)
        self.distance = get_distance(metric)
        # A buffer, not a parameter: saved in state_dict, moved by .to(), never trained.
        self.register_buffer("anchors", anchors.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.anchors.shape[0]

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        features = fp32(features)  # (B, D)
        return self.distance(features, self.anchors.to(features.dtype))  # (B, C)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return -self.scale * self.distances(features)  # (B, C)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.distances(features).argmin(1)  # nearest anchor

    def class_vectors(self) -> tuple[torch.Tensor, str]:
        return self.anchors.detach(), "anchors"

    def loss_floor(self) -> float:
        from ncmcli.floors import loss_floor

        return loss_floor(self.anchors, self.metric, self.scale)

    def extra_repr(self) -> str:
        c, d = self.anchors.shape
        return f"metric={self.metric}, scale={self.scale}, classes={c}, dim={d}"


class SoftmaxLoss(Criterion):
    """The SoftMax baseline: Linear(d, C) + cross-entropy. For d = 2 this is the paper's
    extra FC layer with C outputs on top of the 2-D feature."""

    def __init__(self, dim: int, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.label_smoothing = float(label_smoothing)  # an extension: 0 is the paper's SoftMax

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(fp32(features))  # (B, C)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features), targets, label_smoothing=self.label_smoothing)


NCM_METRICS = registry.NCM_LOSSES  # loss name -> distance, for the losses with anchors
assert set(NCM_METRICS.values()) <= set(DISTANCES)


def build_ncm(loss_cfg, *, anchors: torch.Tensor | None, dim: int, num_classes: int) -> NCMLoss:
    if anchors is None or tuple(anchors.shape) != (num_classes, dim):
        raise ConfigError(f"{loss_cfg.name} needs anchors of shape ({num_classes}, {dim})")
    return NCMLoss(anchors, metric=NCM_METRICS[loss_cfg.name], scale=loss_cfg.scale)


def build_softmax(loss_cfg, *, anchors=None, dim: int, num_classes: int) -> SoftmaxLoss:
    return SoftmaxLoss(dim, num_classes, label_smoothing=loss_cfg.label_smoothing)


def build_criterion(loss_cfg, *, anchors: torch.Tensor | None, dim: int, num_classes: int) -> Criterion:
    """The criterion for a ``loss`` config section, through the registry (``ncmcli.registry``);
    NCM losses need ``anchors`` of shape (C, dim)."""
    entry = registry.LOSSES.get(loss_cfg.name)
    if entry is None:
        raise ConfigError(f"unknown loss {loss_cfg.name!r}; choose one of: {', '.join(registry.LOSSES)}"
                          + registry.suggest(loss_cfg.name, registry.LOSSES))
    return entry.build(loss_cfg, anchors=anchors, dim=dim, num_classes=num_classes)
