"""``Classifier``: the one model object. A feature net, a criterion (fixed anchors or a learned
head), the class names and the input format (shape, and the normalisation of uint8 pixels).
Training, evaluation, checkpoints, export and EMA all hold one of these."""

from __future__ import annotations

import torch
from torch import nn

from ncmcli.nn.anchors import make_anchors
from ncmcli.nn.criteria import build_criterion
from ncmcli.nn.models import backbone_parameters, build_net
from ncmcli.nn.slots import assign_slots, grow_head
from ncmcli.registry import NCM_LOSSES


class Classifier(nn.Module):
    """Images in, class decisions out.

    Every method takes a batch ``x`` of shape (B, C, H, W): uint8 pixels are normalised with the
    classifier's own mean and std (the form ``predict`` reads from disk); a floating batch is taken
    as already normalised (the form ncm's batches produce). ``classes`` are the names of the
    logits' columns, in order."""

    def __init__(self, net: nn.Module, criterion: nn.Module, *, classes, mean, std, input_shape):
        super().__init__()
        classes = list(classes)
        if len(mean) != input_shape[0] or len(std) != input_shape[0]:
            raise ValueError(f"mean and std need {input_shape[0]} values (one per channel)")
        self.net, self.criterion = net, criterion
        self.classes, self.input_shape = classes, tuple(int(s) for s in input_shape)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        # Pixel units, so that a uint8 batch needs one subtraction and one division.
        self.register_buffer(
            "pixel_mean", torch.tensor([255.0 * v for v in self.mean]).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor([255.0 * v for v in self.std]).view(1, -1, 1, 1), persistent=False
        )

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @property
    def anchors(self) -> torch.Tensor | None:
        """The class anchors (C, d), or None for a learned head."""
        return self.criterion.anchors

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return (x.float() - self.pixel_mean) / self.pixel_std
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.criterion.logits(self.features(x))

    forward = logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class index of each image: the nearest anchor (NCM) or the largest logit."""
        return self.criterion.predict(self.features(x))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """M(f(x), a_c) for every class (B, C); NCM criteria only."""
        if not self.criterion.uses_anchors:
            raise TypeError(f"{type(self.criterion).__name__} has no anchors to measure distances to")
        return self.criterion.distances(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.features(x), y)

    def param_groups(self, lr: float, backbone_lr_factor: float = 1.0) -> list[dict]:
        """The optimiser's parameter groups (nanoGPT's ``configure_optimizers``): see
        ``param_groups``."""
        return param_groups(self.net, self.criterion, lr, backbone_lr_factor)

    def parts(self) -> tuple[nn.Module, nn.Module]:
        return self.net, self.criterion

    @classmethod
    def from_config(
        cls,
        cfg,
        classes,
        input_shape,
        *,
        mean=None,
        std=None,
        class_counts=None,
        anchors: torch.Tensor | int | None = None,
        class_slots: torch.Tensor | None = None,
        scale: float | None = None,
        pretrained: bool | None = None,
    ) -> Classifier:
        """The one builder: the net of ``cfg.model``, anchors of ``cfg.anchors`` (made here unless
        given: a checkpoint passes its own; an int S gives S placeholder rows, a template whose sizes a
        checkpoint checks before reading its tensors), the criterion of ``cfg.loss``. ``classes`` is a list of
        names or a count; ``class_counts`` (training images per class) is the prior of
        ``loss.logit_adjust``; ``scale`` fixes an NCM scale a checkpoint resolved already. ``cfg`` is
        read by attribute only (any object with ``model``, ``anchors`` and ``loss``)."""

        names = [str(c) for c in range(classes)] if isinstance(classes, int) else list(classes)
        c = len(names)
        net = build_net(
            cfg.model.arch,
            in_channels=input_shape[0],
            image_size=input_shape[1],
            dropout=cfg.model.dropout,
            feature_dim=cfg.model.feature_dim or None,
            head=cfg.model.head,
            pretrained=cfg.model.pretrained if pretrained is None else pretrained,
        )
        if cfg.loss.name in NCM_LOSSES and isinstance(anchors, int):  # a shape template: every row e_0
            anchors = torch.zeros(anchors, net.feature_dim)
            anchors[:, 0] = 1.0
        if cfg.loss.name in NCM_LOSSES and anchors is None:
            slots = cfg.anchors.slots or c
            if slots < c:
                raise ValueError(
                    f"anchors.slots={slots} is fewer than the {c} classes; give at least {c}, more to "
                    "leave room for classes added later (--extend)"
                )
            anchors = make_anchors(cfg.anchors.method, slots, net.feature_dim, seed=cfg.anchors.seed)
            if cfg.anchors.slots:
                class_slots = torch.tensor(assign_slots(anchors, [], c), dtype=torch.int64)
        # On the CPU even under a meta-device context: the prior is read, not just shaped.
        prior = (
            None
            if class_counts is None
            else torch.tensor(list(class_counts), dtype=torch.float64, device="cpu")
        )
        criterion = build_criterion(
            cfg.loss,
            anchors=anchors if cfg.loss.name in NCM_LOSSES else None,
            dim=net.feature_dim,
            num_classes=c,
            prior=prior,
            scale=scale,
            class_slots=class_slots,
        )
        return cls(
            net,
            criterion,
            classes=names,
            mean=mean or [0.0] * input_shape[0],
            std=std or [1.0] * input_shape[0],
            input_shape=input_shape,
        )

    def extended(self, cfg, classes, *, keep_scale: bool, class_counts=None) -> Classifier:
        """This classifier with room for the classes of ``classes`` beyond its own (which come
        first, in order): the net's weights copied, NCM slots kept bit-identical with a free slot
        for each new class, learned heads grown by fresh rows; the same input format. Raises
        ValueError when no free slot is left."""

        names, n_old, old = list(classes), len(self.classes), self.criterion
        if names[:n_old] != self.classes:
            raise ValueError("the extended classes must start with this classifier's, in order")
        kw = dict(mean=self.mean, std=self.std, class_counts=class_counts, pretrained=False)
        if old.uses_anchors:
            slots = self._slot_anchors()
            used = old.class_slots.tolist() if old.has_slots else list(range(n_old))
            new = assign_slots(slots, used, len(names) - n_old)
            child = Classifier.from_config(
                cfg,
                names,
                self.input_shape,
                anchors=slots,
                class_slots=torch.tensor(used + new, dtype=torch.int64),
                scale=old.scale_value() if keep_scale else None,
                **kw,
            )
        else:
            child = Classifier.from_config(cfg, names, self.input_shape, **kw)
            grow_head(old, child.criterion, n_old)
        child.net.load_state_dict(self.net.state_dict())
        return child

    def _slot_anchors(self) -> torch.Tensor | None:
        crit = self.criterion
        if not crit.uses_anchors:
            return None
        return crit.slot_anchors if crit.has_slots else crit.anchors


def param_groups(
    net: nn.Module, criterion: nn.Module, lr: float, backbone_lr_factor: float = 1.0
) -> list[dict]:
    """Every parameter in one group at ``lr``, but: the backbone at ``lr * backbone_lr_factor``
    in its own group (only when the factor is not 1, so runs without it keep one group), and a
    learned NCM scale (log s) without weight decay, as decay would pull s towards 1, the flat
    softmax the learned scale is there to leave."""
    no_decay = {id(p) for n, p in criterion.named_parameters() if n == "log_scale"}
    slow = {id(p) for p in backbone_parameters(net)} if backbone_lr_factor != 1 else set()
    everything = list(net.parameters()) + list(criterion.parameters())
    groups = [{"params": [p for p in everything if id(p) not in no_decay | slow]}]
    if slow:
        groups.append(
            {"params": [p for p in net.parameters() if id(p) in slow], "lr": lr * backbone_lr_factor}
        )
    if no_decay:
        groups.append(
            {"params": [p for p in criterion.parameters() if id(p) in no_decay], "weight_decay": 0.0}
        )
    return groups
