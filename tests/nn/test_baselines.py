"""The baselines against naive per-sample references in float64, plus finite gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from ncmcli.nn.baselines import CenterLoss, HingeLoss, LSoftmaxLoss
from ncmcli.nn.losses import SoftmaxLoss


def _data(b=9, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g))


def test_caffe_hinge_matches_reference():
    feats, y = _data()
    crit = HingeLoss(5, 4).double()
    w, b = crit.fc.weight, crit.fc.bias
    total = 0.0
    for f, t in zip(feats, y):
        scores = (w @ f + b).tolist()
        total += sum(max(0.0, 1.0 - (1.0 if k == t else -1.0) * s) for k, s in enumerate(scores))
    assert crit(feats, y).item() == pytest.approx(total / len(y), abs=1e-9)


def test_weston_watkins_hinge_matches_reference():
    feats, y = _data()
    crit = HingeLoss(5, 4, form="weston-watkins").double()
    total = 0.0
    for f, t in zip(feats, y):
        s = (crit.fc.weight @ f + crit.fc.bias).tolist()
        total += sum(max(0.0, 1.0 - s[t] + s[j]) for j in range(4) if j != t) / 4
    assert crit(feats, y).item() == pytest.approx(total / len(y), abs=1e-9)


def _lsoftmax_ref(crit, feats, y, lam):
    m, w = crit.margin, crit.weight.detach()
    total = 0.0
    for f, t in zip(feats, y):
        z = (w @ f).tolist()
        wn, xn = w[t].norm().item(), f.norm().item()
        theta = math.acos(max(-1.0, min(1.0, z[t] / (wn * xn))))
        k = min(int(theta * m / math.pi), m - 1)
        psi = (-1) ** k * math.cos(m * theta) - 2 * k
        z[t] = (lam * z[t] + wn * xn * psi) / (1 + lam)
        total += -(z[t] - math.log(sum(math.exp(v) for v in z)))
    return total / len(y)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 50.0])
def test_lsoftmax_matches_reference(m, lam):
    torch.manual_seed(m)
    feats, y = _data(b=12)
    crit = LSoftmaxLoss(5, 4, m).double().eval()
    got = F.cross_entropy(crit.margin_logits(feats, y, lam), y).item()
    assert got == pytest.approx(_lsoftmax_ref(crit, feats, y, lam), abs=1e-9)


def test_lsoftmax_m1_is_plain_softmax_without_bias():
    feats, y = _data()
    crit = LSoftmaxLoss(5, 4, 1).double()
    assert torch.allclose(crit(feats, y), F.cross_entropy(feats @ crit.weight.T, y), atol=1e-12)


def test_lsoftmax_lambda_anneals_and_counts_training_steps():
    crit = LSoftmaxLoss(5, 4, 2, base=1000, gamma=0.12, power=1, lambda_min=5)
    assert crit.current_lambda() == 1000
    feats, y = _data()
    crit(feats.float(), y)
    assert int(crit.iteration) == 1 and crit.current_lambda() == pytest.approx(1000 / 1.12)
    crit.eval()
    crit(feats.float(), y)
    assert int(crit.iteration) == 1  # evaluation does not advance the schedule
    crit.iteration.fill_(10**6)
    assert crit.current_lambda() == 5  # lambda_min


@pytest.mark.parametrize("m", [2, 4])
def test_lsoftmax_gradcheck(m):
    feats, y = _data(b=5, seed=3)
    feats.requires_grad_(True)
    crit = LSoftmaxLoss(5, 4, m).double()
    assert torch.autograd.gradcheck(lambda f: F.cross_entropy(crit.margin_logits(f, y, 0.3), y), (feats,))


def test_lsoftmax_m4_stays_finite_for_200_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    crit = LSoftmaxLoss(8, 10, 4, base=1000, gamma=0.12, power=1, lambda_min=0)
    opt = torch.optim.SGD(list(net.parameters()) + list(crit.parameters()), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    x[0] = 0.0  # a zero input gives a feature equal to the bias path; keep one edge case in
    for _ in range(200):
        loss = crit(net(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in list(net.parameters()) + [crit.weight])
        opt.step()
    assert crit.current_lambda() < 50


def test_lsoftmax_zero_feature_is_finite():
    crit = LSoftmaxLoss(3, 4, 4)
    f = torch.zeros(2, 3, requires_grad=True)
    loss = crit(f, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


def test_center_loss_matches_reference_and_updates_centres():
    feats, y = _data(b=8)
    crit = CenterLoss(5, 4, weight=0.7, alpha=0.5).double()
    crit.centers.copy_(torch.randn(4, 5, dtype=torch.float64))
    c0 = crit.centers.clone()
    ce = F.cross_entropy(crit.fc(feats), y).item()
    center = (
        sum(0.5 * sum((fi - ci) ** 2 for fi, ci in zip(f.tolist(), c0[t].tolist())) for f, t in zip(feats, y))
        / 8
    )
    assert crit(feats, y).item() == pytest.approx(ce + 0.7 * center, abs=1e-9)
    for j in range(4):  # Wen et al.: c_j -= alpha * sum_{y_i=j} (c_j - x_i) / (1 + n_j)
        members = feats[y == j]
        delta = (
            (c0[j] - members).sum(0) / (1 + len(members))
            if len(members)
            else torch.zeros(5, dtype=torch.float64)
        )
        assert torch.allclose(crit.centers[j], c0[j] - 0.5 * delta, atol=1e-12)
    assert list(n for n, _ in crit.named_parameters()) == ["fc.weight", "fc.bias"]  # centres: not optimised


def test_center_loss_with_zero_weight_is_softmax():
    feats, y = _data()
    torch.manual_seed(0)
    center = CenterLoss(5, 4, weight=0.0).double()
    torch.manual_seed(0)
    soft = SoftmaxLoss(5, 4).double()
    assert torch.equal(center(feats, y), soft(feats, y))


def test_center_loss_gradcheck():
    feats, y = _data(b=4)
    feats.requires_grad_(True)
    crit = CenterLoss(5, 4, weight=0.5, alpha=0.0).double()
    crit.centers.normal_()
    assert torch.autograd.gradcheck(lambda f: crit(f, y), (feats,))


def test_hinge_gradcheck():
    feats, y = _data(b=4)
    feats = feats * 0.1  # stay away from the hinge's kinks
    feats.requires_grad_(True)
    crit = HingeLoss(5, 4).double()
    assert torch.autograd.gradcheck(lambda f: crit(f, y), (feats,))


@pytest.mark.parametrize("loss", ["softmax", "hinge", "lsoftmax", "center", "cncm", "encm"])
def test_every_loss_trains_end_to_end_on_quickstart_and_reloads(tmp_path, loss):
    from ncmcli.config.presets import resolve
    from ncmcli.runs import checkpoint
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    cfg = resolve(
        "quickstart",
        [
            f"loss.name={loss}",
            "train.epochs=2",
            "data.limit_train=640",
            "data.limit_test=200",
            "optim.lr=0.01",
        ],
    )
    result = train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    assert result["loss"] == loss and result["test_acc"] > 0.3  # learnt something (chance is 0.1)
    ck = checkpoint.load(tmp_path / "last.safetensors")
    assert (
        type(ck.criterion).__name__
        == {
            "softmax": "SoftmaxLoss",
            "hinge": "HingeLoss",
            "lsoftmax": "LSoftmaxLoss",
            "center": "CenterLoss",
            "cncm": "NCMLoss",
            "encm": "NCMLoss",
        }[loss]
    )
