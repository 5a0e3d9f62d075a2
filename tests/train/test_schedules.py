"""Optimisers and learning-rate schedules (ncmcli/train/schedules.py) against the paper's recipe
(Section 4.2) and the arithmetic they must follow."""

import pytest
import torch

from ncmcli.config import presets as P
from ncmcli.config.presets import resolve
from ncmcli.errors import ConfigError
from ncmcli.train.schedules import PlateauOnExcess, Warmup, make_optimizer, make_scheduler


def test_warmup_ramps_then_hands_over_to_the_schedule():
    cfg = resolve(
        "quickstart",
        [
            "optim.schedule=multistep",
            "optim.milestones=6",
            "optim.milestone_unit=step",
            "optim.lr=0.1",
            "optim.warmup_epochs=0.4",
        ],
    )
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2), torch.nn.Identity())
    sched, per_step = make_scheduler(cfg, opt, steps_per_epoch=10)
    warm = Warmup(opt, round(cfg.optim.warmup_epochs * 10))
    used = []
    for step in range(8):
        warm.step(step, lambda: (used.append(opt.param_groups[0]["lr"]), opt.step()))
        sched.step()
    assert used == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule's lr, not the warmed one


def test_adamw_and_nesterov():
    model = torch.nn.Linear(3, 2)
    adamw = make_optimizer(
        resolve("quickstart", ["optim.name=adamw", "optim.betas=0.8,0.99", "optim.lr=0.001"]),
        model,
        torch.nn.Identity(),
    )
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.99)
    sgd = make_optimizer(resolve("quickstart", ["optim.nesterov=true"]), model, torch.nn.Identity())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    with pytest.raises(ConfigError, match="nesterov"):
        resolve("quickstart", ["optim.nesterov=true", "optim.name=adamw"])
    with pytest.raises(ConfigError, match="betas"):
        resolve("quickstart", ["optim.name=adamw", "optim.betas=0.9"])


def _optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _cut_epochs(scheduler, losses):
    """The epochs (1-based) after which the scheduler cut the lr."""
    cuts, lr = [], scheduler.optimizer.param_groups[0]["lr"]
    for epoch, loss in enumerate(losses, 1):
        scheduler.step(loss)
        new = scheduler.optimizer.param_groups[0]["lr"]
        if new < lr:
            cuts.append(epoch)
        lr = new
    return cuts


# A curve of excess over the floor: fast progress, then a slow creep (< 1% per epoch of the
# raw loss near an NCM floor, > 1% of the excess), then a plateau.
EXCESS = [
    2.0,
    1.0,
    0.5,
    0.3,
    0.2,
    0.15,
    0.12,
    0.1,
    0.09,
    0.082,
    0.075,
    0.069,
    0.064,
    *[0.064] * 8,
    0.03,
    0.02,
    *[0.02] * 10,
]


NCM_FLOOR = 1.159  # E-NCM, 10 orthonormal anchors


def test_plateau_cuts_at_the_same_epochs_for_equal_excess_over_different_floors():
    softmax = PlateauOnExcess(_optimizer(), floor=0.0, patience=3)
    ncm = PlateauOnExcess(_optimizer(), floor=NCM_FLOOR, patience=3)
    cuts_softmax = _cut_epochs(softmax, EXCESS)
    cuts_ncm = _cut_epochs(ncm, [NCM_FLOOR + e for e in EXCESS])
    assert cuts_softmax == cuts_ncm and len(cuts_softmax) >= 2
    # The old rule (1% of the raw loss) cuts the NCM curve earlier: the fix is not a no-op.
    raw = torch.optim.lr_scheduler.ReduceLROnPlateau(_optimizer(), factor=0.1, patience=3, threshold=0.01)
    assert _cut_epochs(raw, [NCM_FLOOR + e for e in EXCESS])[0] < cuts_ncm[0]


def test_plateau_makes_exactly_max_drops_cuts_and_resumes_from_its_state():
    sched = PlateauOnExcess(_optimizer(0.1), patience=0, max_drops=3)
    cuts = _cut_epochs(sched, [1.0] * 20)
    assert len(cuts) == 3 and sched.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    again = PlateauOnExcess(_optimizer(1e-4), patience=0, max_drops=3)
    again.load_state_dict(sched.state_dict())
    assert _cut_epochs(again, [1.0] * 5) == []
    floor = PlateauOnExcess(_optimizer(0.1), patience=0, max_drops=10, min_lr=0.005)
    _cut_epochs(floor, [1.0] * 20)
    assert floor.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_multistep_cuts_at_its_milestones(unit):
    cfg = P.resolve(
        "quickstart",
        ["optim.schedule=multistep", "optim.milestones=3,5", f"optim.milestone_unit={unit}", "optim.lr=0.1"],
    )
    opt = _optimizer(0.1)
    sched, per_step = make_scheduler(cfg, opt, steps_per_epoch=10)
    assert per_step == (unit == "step")
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_multistep_needs_milestones_and_parses_them():
    with pytest.raises(ConfigError, match="needs optim.milestones"):
        P.resolve("quickstart", ["optim.schedule=multistep"])
    with pytest.raises(ConfigError, match="increasing"):
        P.resolve("quickstart", ["optim.milestones=[7500, 5000]"])
    assert P.resolve("quickstart", ["optim.milestones=[5000, 7500]"]).optim.milestones == (5000, 7500)
    assert P.resolve("quickstart", ["optim.milestones="]).optim.milestones == ()
