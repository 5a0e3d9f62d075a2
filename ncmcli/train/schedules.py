"""The optimiser and the learning-rate schedules: the paper's plateau rule (fair to every
loss), Liu et al.'s multistep, and cosine."""

from __future__ import annotations

import bisect
import math

import torch

from ncmcli.config.schema import Config
from ncmcli.config.values import parse_betas
from ncmcli.nn.classifier import param_groups


def make_optimizer(cfg: Config, model, criterion) -> torch.optim.Optimizer:
    """The paper's SGD (momentum, weight decay on every parameter), optionally with Nesterov
    momentum; or AdamW. Neither option is part of the paper."""

    o = cfg.optim
    groups = param_groups(model, criterion, o.lr, o.backbone_lr_factor)  # the model's own groups
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=parse_betas(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )


class Warmup:
    """A linear ramp of the learning rate over the first ``steps`` steps, in front of any
    schedule: for the optimiser step ``i`` (0-based) the lr is (i + 1) / steps of what the
    schedule says. The schedule's own lr is put back after the step, so plateau cuts,
    milestones and cosine are untouched and the logged lr is the schedule's."""

    def __init__(self, optimizer, steps: int):
        self.optimizer, self.steps = optimizer, int(steps)

    def factor(self, step: int) -> float:
        return 1.0 if step >= self.steps else (step + 1) / self.steps

    def step(self, global_step: int, do_step) -> None:
        """Run ``do_step()`` (the optimiser step) at the warmed-up lr of ``global_step``."""
        f = self.factor(global_step)
        if f == 1.0:
            do_step()
            return
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * f
        try:
            do_step()
        finally:
            for g, lr in zip(self.optimizer.param_groups, saved):
                g["lr"] = lr


class PlateauOnExcess:
    """The paper's "divide it by 10 when the training loss plateaus", fair to every loss.

    Progress is measured on the *excess* of the epoch's training loss over the criterion's
    floor (0 for softmax-type heads; 1.159 nats for E-NCM with 10 orthonormal anchors). A 1%
    drop of a raw NCM loss near its floor would be a 12-14% drop of what is left, so NCM runs
    would be cut far earlier than SoftMax runs under a rule on the raw loss.

    An epoch improves when ``excess < best * (1 - threshold)``. After more than ``patience``
    epochs without improvement the lr is multiplied by ``factor``, at most ``max_drops``
    times and never below ``min_lr``. Its state is plain numbers (resumable, pickle-free)."""

    def __init__(
        self,
        optimizer,
        *,
        floor: float = 0.0,
        factor: float = 0.1,
        patience: int = 5,
        threshold: float = 0.01,
        max_drops: int = 3,
        min_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.floor, self.factor, self.patience = float(floor), factor, patience
        self.threshold, self.max_drops, self.min_lr = threshold, max_drops, min_lr
        self.best = math.inf
        self.bad_epochs = 0
        self.drops = 0

    def step(self, train_loss: float) -> bool:
        """Record one epoch's mean training loss; True when the lr was cut."""
        excess = max(train_loss - self.floor, 0.0)
        if excess < self.best * (1.0 - self.threshold):
            self.best, self.bad_epochs = excess, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs <= self.patience or self.drops >= self.max_drops:
            return False
        cut = False
        for group in self.optimizer.param_groups:
            new = max(group["lr"] * self.factor, self.min_lr)
            cut |= new < group["lr"]
            group["lr"] = new
        self.bad_epochs = 0
        self.drops += int(cut)
        return cut

    def state_dict(self) -> dict:
        return {
            "best": None if math.isinf(self.best) else self.best,
            "bad_epochs": self.bad_epochs,
            "drops": self.drops,
            "floor": self.floor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_epochs = int(state.get("bad_epochs", state.get("num_bad_epochs", 0)))
        self.drops = int(state.get("drops", 0))


def multistep_factor(step: int, milestones, factor: float) -> float:
    """The lr multiplier after ``step`` steps (or epochs): ``factor`` per milestone passed."""
    return factor ** bisect.bisect_right(list(milestones), step)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int, *, floor: float = 0.0):
    """(scheduler, per_step). Plateau steps once per epoch on the training loss's excess over
    ``floor``; multistep cuts at its milestones, counted in epochs or in steps (iterations)."""
    o = cfg.optim
    if o.schedule == "plateau":
        return PlateauOnExcess(
            optimizer,
            floor=floor,
            factor=o.lr_factor,
            patience=o.patience,
            threshold=o.threshold,
            max_drops=o.max_drops,
            min_lr=o.min_lr,
        ), False
    if o.schedule == "multistep":
        per_step = o.milestone_unit == "step"
        milestones, factor = tuple(o.milestones), o.lr_factor
        # A per-step LambdaLR sees its own step count; a per-epoch one is stepped after each epoch.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: multistep_factor(s, milestones, factor)
        ), per_step
    if o.schedule == "cosine":
        total = max(1, cfg.train.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        ), True
    return None, False
