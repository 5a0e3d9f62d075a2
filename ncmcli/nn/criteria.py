"""The criterion for a ``loss`` config section: every registered loss name
(``registry.LOSSES``) maps to its builder here, and ``build_criterion`` is the one entry point.
A builder takes ``(loss_cfg, *, anchors, dim, num_classes, ...)`` and returns a ``Criterion``."""

from __future__ import annotations

import torch

from ncmcli import registry
from ncmcli.nn.baselines import build_center, build_hinge, build_lsoftmax
from ncmcli.nn.criterion import Criterion
from ncmcli.nn.losses import build_ncm, build_softmax

# One line per name in registry.LOSSES (a test checks they agree).
LOSS_BUILDERS = {
    "softmax": build_softmax,
    "encm": build_ncm,
    "cncm": build_ncm,
    "sqncm": build_ncm,
    "hinge": build_hinge,
    "lsoftmax": build_lsoftmax,
    "center": build_center,
}


def build_criterion(
    loss_cfg,
    *,
    anchors: torch.Tensor | None,
    dim: int,
    num_classes: int,
    prior: torch.Tensor | None = None,
    scale: float | None = None,
    class_slots: torch.Tensor | None = None,
) -> Criterion:
    """The criterion for a ``loss`` config section, through the registry (``ncmcli.registry``);
    NCM losses need ``anchors`` of shape (C, dim). ``prior``: the training class counts, for
    ``loss.logit_adjust``; ``scale``: an NCM loss's resolved scale, when already known;
    ``class_slots``: an NCM loss's slot per class, when ``anchors`` are pre-allocated slots."""
    entry = registry.LOSSES.get(loss_cfg.name)
    if entry is None:
        raise ValueError(
            f"unknown loss {loss_cfg.name!r}; choose one of: {', '.join(registry.LOSSES)}"
            + registry.suggest(loss_cfg.name, registry.LOSSES)
        )
    kw = {}
    if "logit_adjust" in entry.keys:
        kw["prior"] = prior
    if entry.metric:
        kw["scale"], kw["class_slots"] = scale, class_slots
    return LOSS_BUILDERS[loss_cfg.name](loss_cfg, anchors=anchors, dim=dim, num_classes=num_classes, **kw)
