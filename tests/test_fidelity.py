"""The recipe against the paper (Section 4.2, Tables 1-3) and against Liu et al.'s released
L-Softmax solver: the plateau rule, multistep, lambda annealing, heads, presets."""

import shutil

import pytest
import torch


from ncmcli.config import overrides as O
from ncmcli.errors import ConfigError
from ncmcli.config import presets as P
from ncmcli.nn.baselines import LSoftmaxLoss
from ncmcli.train.schedules import PlateauOnExcess, make_scheduler


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
EXCESS = [2.0, 1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.09, 0.082, 0.075, 0.069, 0.064,
          *[0.064] * 8, 0.03, 0.02, *[0.02] * 10]
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
    cfg = P.resolve("quickstart", ["optim.schedule=multistep", "optim.milestones=3,5",
                                   f"optim.milestone_unit={unit}", "optim.lr=0.1"])
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


# Liu et al.'s released solvers (wy1iu/LargeMargin_Softmax_Loss, myexamples/*).
LIU = {"mnist-lsoftmax4": (2.5e-5, 35.0), "cifar10-lsoftmax2": (2e-5, 45.0), "cifar10plus-lsoftmax2": (1e-5, 45.0)}


@pytest.mark.parametrize("preset", sorted(LIU))
def test_lsoftmax_lambda_follows_the_released_annealing(preset):
    gamma, power = LIU[preset]
    cfg = P.resolve(preset)
    assert (cfg.loss.lambda_base, cfg.loss.lambda_gamma, cfg.loss.lambda_power, cfg.loss.lambda_min) == (1000, gamma, power, 0)
    loss = LSoftmaxLoss(8, 10, cfg.loss.margin, base=cfg.loss.lambda_base, gamma=cfg.loss.lambda_gamma,
                        power=cfg.loss.lambda_power, lambda_min=cfg.loss.lambda_min)
    for it in (0, 5000, 30000):
        loss.iteration.fill_(it)
        assert loss.current_lambda() == pytest.approx(max(0.0, 1000.0 * (1.0 + gamma * it) ** (-power)), rel=1e-12)
    loss.iteration.fill_(0)
    assert loss.current_lambda() == 1000.0


def test_liu_presets_follow_the_released_solver():
    for ds, milestones in (("mnist", (5000, 7500)), ("cifar10", (5000, 7500)), ("cifar10plus", (8000, 12000)),
                           ("cifar100", (5000, 7500))):
        for method in ("hinge", "lsoftmax2", "lsoftmax3", "lsoftmax4"):
            cfg = P.resolve(f"{ds}-{method}")
            assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (128, 0.1, 0.9, 5e-4)
            assert (cfg.optim.schedule, cfg.optim.milestone_unit, cfg.optim.milestones) == ("multistep", "step", milestones)
            assert cfg.model.dropout == 0 and cfg.model.head == "linear-bn-relu"
            steps = -(-(60000 if ds == "mnist" else 50000) // 128)
            assert 30000 <= cfg.train.epochs * steps < 30000 + steps  # 30,000 iterations
            assert cfg.data.hflip == (ds in ("cifar10", "cifar100")) and cfg.data.augment == (ds == "cifar10plus")
            assert "Liu" in cfg.description


def test_paper_presets_follow_section_4_2():
    for ds in ("mnist", "cifar10", "cifar10plus", "cifar100"):
        for m in ("softmax", "cncm", "encm"):
            cfg = P.resolve(f"{ds}-{m}")
            assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.schedule) == (256, 90, 0.1, "plateau")
            assert cfg.model.dropout == 0.1 and cfg.model.head == "linear" and cfg.data.normalization == "global"
    for m in ("softmax", "cncm", "encm", "center"):
        cfg = P.resolve(f"mnist2d-{m}")
        assert cfg.model.dropout == 0.0 and cfg.model.arch == "mnist2d"  # dropout only after Figure 2


def test_bn_relu_head_is_liu_et_als_and_linear_reaches_negative_coordinates():
    from ncmcli.nn.models import build_net

    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    liu = build_net("tiny", in_channels=1, image_size=28, head="linear-bn-relu").train()
    f = liu(x)
    assert isinstance(liu.head[0], torch.nn.BatchNorm1d) and (f >= 0).all() and (f > 0).any()
    plain = build_net("tiny", in_channels=1, image_size=28).train()
    assert plain.head is None and (plain(x) < 0).any()
    with pytest.raises(ConfigError, match="model.head"):
        build_net("tiny", in_channels=1, image_size=28, head="relu")


def test_global_normalisation_is_one_mean_and_std_over_all_channels():
    from ncmcli.data.batching import channel_stats

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0] //= 4  # channels with different statistics
    mean, std = channel_stats(images, per_channel=False)
    x = images.double() / 255
    assert mean == pytest.approx([x.mean().item()] * 3) and std == pytest.approx([x.std().item()] * 3)
    per = channel_stats(images)
    assert per[0][0] == pytest.approx(x[:, 0].mean().item()) and per[0][0] != pytest.approx(mean[0])


def test_flip_only_batches_mirror_or_keep_each_image():
    from ncmcli.data.batching import Split, batches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 6, 6), generator=g, dtype=torch.uint8)
    split = Split(images, torch.arange(64))
    flipped = kept = 0
    for x, y in batches(split, 16, mean=[0.0], std=[1 / 255], device="cpu",
                        generator=torch.Generator().manual_seed(1), flip_batches=True):
        for xi, yi in zip(x, y):
            orig = images[yi].float()
            if torch.equal(xi, orig):
                kept += 1
            else:
                assert torch.equal(xi, orig.flip(-1))
                flipped += 1
    assert flipped > 10 and kept > 10


def test_changing_one_data_set_base_leaves_the_others_unchanged(tmp_path, monkeypatch):
    before = {name: O.to_yaml(P.resolve(name)) for name in P.list_presets()}
    from ncmcli.config import presets

    copy = tmp_path / "presets"
    shutil.copytree(P.presets_dir(), copy)
    monkeypatch.setattr(presets, "presets_dir", lambda: copy)
    presets._read_yaml_cached.cache_clear()
    (copy / "_cifar100.yaml").write_text((copy / "_cifar100.yaml").read_text() + "train:\n  eval_batch_size: 7\n")
    after = {name: O.to_yaml(P.resolve(name)) for name in P.list_presets()}
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed and all(n.startswith("cifar100-") for n in changed)
    assert len(changed) == len([n for n in before if n.startswith("cifar100-")])
    assert not any(n.startswith("_") for n in before)  # bases are hidden


def test_weights_are_checked_for_nan_before_every_save():
    from ncmcli.train.setup import TrainingDiverged, check_finite

    net, crit = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)
    check_finite(net, crit, "epoch 1")  # finite: no error
    crit.running_var[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="NaN or infinite at epoch 1"):
        check_finite(net, crit, "epoch 1")
    crit.running_var[0] = 1.0
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged):
        check_finite(net, crit, "epoch 2")


def test_cuda_rng_states_restore_in_numeric_order(tmp_path):
    from safetensors.torch import save_file

    from ncmcli.runs import ckfile, trainstate

    state = trainstate.TrainState(trainstate.Progress(), {"state": {}, "param_groups": []}, None,
                                  torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8),
                                  [torch.full((2,), i, dtype=torch.uint8) for i in range(12)])
    tensors, meta = trainstate.pack(state)
    path = tmp_path / "last.safetensors"
    save_file(tensors, str(path), metadata={"train_state": meta, "format": ckfile.FORMAT,
                                            "format_version": str(ckfile.FORMAT_VERSION)})
    back = trainstate.unpack(path)
    assert [int(t[0]) for t in back.cuda_rng] == list(range(12))
