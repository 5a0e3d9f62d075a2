"""The paper's comparison methods, behind the same criterion interface as NCMLoss.

- ``HingeLoss``: multiclass hinge on a Linear(d, C) head. The default is Caffe's
  ``HingeLoss`` layer (one-vs-all, L1), which produced the "Hinge Loss" rows the paper cites
  from the L-Softmax paper; ``weston-watkins`` is ``torch.nn.MultiMarginLoss``.
- ``LSoftmaxLoss``: Large-Margin Softmax (Liu et al. 2016) with its lambda annealing.
- ``CenterLoss``: softmax plus lambda * 1/2 ||f - c_y||^2 (Wen et al. 2016), with the
  centres updated by their own rate alpha, outside the network's optimiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ncmcli import registry
from ncmcli.nn.criterion import Criterion, fp32


class HingeLoss(Criterion):
    FORMS = tuple(registry.HINGE_FORMS)

    def __init__(self, dim: int, num_classes: int, form: str = "ova"):
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"hinge form must be one of {', '.join(self.FORMS)}, got {form!r}")
        self.form = form
        self.fc = nn.Linear(dim, num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(fp32(features))  # (B, C)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.logits(features)  # (B, C)
        if self.form == "weston-watkins":
            return F.multi_margin_loss(t, targets)
        # Caffe HingeLoss (L1): sum_k max(0, 1 - delta_k t_k), delta = +1 for the true class
        # and -1 otherwise, summed over classes and averaged over the batch.
        delta = -torch.ones_like(t)
        delta.scatter_(1, targets[:, None], 1.0)
        return F.relu(1.0 - delta * t).sum(1).mean()


class LSoftmaxLoss(Criterion):
    """Large-Margin Softmax. The target logit ||W_y|| ||x|| cos(theta) becomes
    ||W_y|| ||x|| psi(theta), psi(theta) = (-1)^k cos(m theta) - 2k for theta in
    [k pi/m, (k+1) pi/m], blended as (lambda * ordinary + margin) / (1 + lambda) with
    lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power)). A large lambda at the
    start is what lets it train at all; it decays as training goes on. The defaults are the
    released CIFAR-10 m=2 model's (base 1000, gamma 2e-5, power 45, lambda_min 0). Prediction uses the
    ordinary logits W x (no bias), as the original does at test time."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        margin: int = 2,
        *,
        base: float = 1000.0,
        gamma: float = 2e-5,
        power: float = 45.0,
        lambda_min: float = 0.0,
    ):
        super().__init__()
        if margin not in registry.LSOFTMAX_MARGINS:
            raise ValueError(f"L-Softmax margin must be one of {registry.LSOFTMAX_MARGINS}, got {margin}")
        self.margin = margin
        self.label_smoothing = 0.0  # an extension, set by the builder
        self.base, self.gamma, self.power, self.lambda_min = base, gamma, power, lambda_min
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # Training state that must survive a checkpoint: the annealing step.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        # cos(m t) = sum_n (-1)^n C(m, 2n) cos^(m-2n) t sin^(2n) t (the Chebyshev expansion)
        self._terms = [
            ((-1) ** n * math.comb(margin, 2 * n), margin - 2 * n, n) for n in range(margin // 2 + 1)
        ]
        # Interval edges cos(j pi / m), j = 1..m-1: k counts the edges that cos(theta) is below.
        self.register_buffer(
            "_edges",
            torch.tensor([math.cos(j * math.pi / margin) for j in range(1, margin)], dtype=torch.float64),
            persistent=False,
        )

    def current_lambda(self) -> float:
        """lambda as a number (a host read: for logs, tests and repr, never in the step)."""
        return float(self.lambda_tensor())

    def lambda_tensor(self) -> torch.Tensor:
        """lambda as a 0-d float64 tensor on the iteration's device: the step reads it there,
        so the annealing costs no host sync."""
        lam = self.base * (1.0 + self.gamma * self.iteration.to(torch.float64)) ** (-self.power)
        return lam.clamp_min(self.lambda_min)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return fp32(features) @ self.weight.to(fp32(features).dtype).T  # (B, C)

    def class_vectors(self) -> tuple[torch.Tensor, str]:
        return self.weight.detach(), "class weight vectors"

    def margin_logits(self, features: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
        f = fp32(features)  # (B, D)
        w = self.weight.to(f.dtype)  # (C, D)
        logits = f @ w.T  # (B, C)
        wy_x = logits.gather(1, targets[:, None]).squeeze(1)  # (B,) W_y . x
        # eps inside the sqrt keeps the norms (and their gradients) finite at x = 0.
        norm = torch.sqrt(f.pow(2).sum(1) + 1e-12) * torch.sqrt(w[targets].pow(2).sum(1) + 1e-12)  # (B,)
        cos = (wy_x / norm).clamp(-1.0, 1.0)
        sin2 = 1.0 - cos * cos
        cos_m = sum(c * cos.pow(p) * sin2.pow(n) for c, p, n in self._terms)
        with torch.no_grad():  # k is piecewise constant: no gradient flows through it
            k = (cos[:, None] <= self._edges.to(cos.dtype)).sum(1).to(cos.dtype)
        psi = torch.where(k.remainder(2) == 0, cos_m, -cos_m) - 2.0 * k
        target = (lam * wy_x + norm * psi) / (1.0 + lam)
        return logits.scatter(1, targets[:, None], target[:, None])

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lam = self.lambda_tensor()
        if self.training:
            self.iteration += 1
        return F.cross_entropy(
            self.margin_logits(features, targets, lam), targets, label_smoothing=self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, lambda={self.current_lambda():.4g}"


class CenterLoss(Criterion):
    """Softmax + weight * 1/2 ||f - c_y||^2 (batch mean). The centres are a buffer, moved
    towards their class's features by rate ``alpha`` after each training forward (Wen et
    al.'s update, c_j -= alpha * sum_i (c_j - x_i) / (1 + n_j)); the network optimiser never
    sees them. ``weight = 0`` is plain softmax."""

    def __init__(self, dim: int, num_classes: int, weight: float = 0.003, alpha: float = 0.5):
        super().__init__()
        if weight < 0 or not 0 <= alpha <= 1:
            raise ValueError(f"center loss needs weight >= 0 and alpha in [0, 1], got {weight}, {alpha}")
        # ``lam``, not ``weight``: every criterion's ``weight`` would be a class-vector matrix.
        self.lam, self.alpha = weight, alpha
        self.label_smoothing = 0.0  # an extension, set by the builder
        self.fc = nn.Linear(dim, num_classes)
        self.register_buffer("centers", torch.zeros(num_classes, dim))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(fp32(features))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        f = fp32(features)  # (B, D)
        centers = self.centers.to(f.dtype)  # (C, D)
        diff = f - centers[targets]  # (B, D)
        loss = (
            F.cross_entropy(self.logits(f), targets, label_smoothing=self.label_smoothing)
            + self.lam * 0.5 * diff.pow(2).sum(1).mean()
        )
        if self.training and self.alpha > 0:
            with torch.no_grad():
                pull = torch.zeros_like(centers).index_add_(0, targets, -diff.detach())  # sum (c_j - x_i)
                # index_add_, not bincount: bincount sizes its output from the data (a host sync on CUDA)
                counts = torch.zeros(len(centers), dtype=f.dtype, device=f.device).index_add_(
                    0, targets, torch.ones_like(targets, dtype=f.dtype)
                )
                self.centers -= (self.alpha * pull / (1.0 + counts)[:, None]).to(self.centers.dtype)
        return loss


# -- Builders, registered by name in ncmcli.registry.LOSSES


def build_hinge(loss_cfg, *, anchors=None, dim: int, num_classes: int) -> HingeLoss:
    return HingeLoss(dim, num_classes, form=loss_cfg.hinge_form)


def build_lsoftmax(loss_cfg, *, anchors=None, dim: int, num_classes: int) -> LSoftmaxLoss:
    crit = LSoftmaxLoss(
        dim,
        num_classes,
        loss_cfg.margin,
        base=loss_cfg.lambda_base,
        gamma=loss_cfg.lambda_gamma,
        power=loss_cfg.lambda_power,
        lambda_min=loss_cfg.lambda_min,
    )
    crit.label_smoothing = loss_cfg.label_smoothing
    return crit


def build_center(loss_cfg, *, anchors=None, dim: int, num_classes: int) -> CenterLoss:
    crit = CenterLoss(dim, num_classes, weight=loss_cfg.center_weight, alpha=loss_cfg.center_alpha)
    crit.label_smoothing = loss_cfg.label_smoothing
    return crit
