"""The interface every criterion implements (``Criterion``), and what the criteria share:
float32 distances under autocast (``fp32``) and Menon et al.'s logit-adjustment bias
(``logit_bias``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        # Menon et al.'s logit adjustment, tau * log(prior) (C,), added in the loss only; None = off.
        # Rebuilt from the class counts a checkpoint stores, never trained.
        self.register_buffer("logit_bias", None, persistent=False)

    def set_logit_bias(self, bias: torch.Tensor | None, num_classes: int) -> None:
        if bias is not None and tuple(bias.shape) != (num_classes,):
            raise ValueError(f"logit_bias must have shape ({num_classes},), got {tuple(bias.shape)}")
        self.logit_bias = None if bias is None else bias.detach().float().clone()

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the loss sees: with the logit adjustment when it is on."""
        return logits if self.logit_bias is None else logits + self.logit_bias.to(logits.dtype)

    def logits(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        raise NotImplementedError

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.adjusted(self.logits(features)), targets)

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


def logit_bias(tau: float, prior: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """tau * log(prior) as a (C,) float32 bias, or None when tau is 0 (the loss is then
    exactly the unadjusted one). ``prior`` is the training class frequencies (or counts)."""
    if tau == 0:
        return None
    if prior is None:
        raise ValueError("loss.logit_adjust needs the training class counts (none are known for this model)")
    if not isinstance(prior, torch.Tensor):
        prior = torch.tensor(list(prior), dtype=torch.float64, device="cpu")
    prior = prior.detach().to("cpu", torch.float64).flatten()  # .to, not a factory: safe on the meta device
    if len(prior) != num_classes or not bool((prior > 0).all()):
        raise ValueError(f"loss.logit_adjust needs a positive count for each of the {num_classes} classes")
    return (tau * torch.log(prior / prior.sum())).float()
