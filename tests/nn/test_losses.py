import math

import pytest
import torch
import torch.nn.functional as F

from ncmcli import NCMLoss, make_anchors
from ncmcli.config.presets import resolve
from ncmcli.errors import ConfigError
from ncmcli.nn.criteria import build_criterion
from ncmcli.nn.losses import SoftmaxLoss


def ref_distance(f, a, metric):
    if metric == "euclidean":
        return math.sqrt(sum((fi - ai) ** 2 for fi, ai in zip(f, a)))
    if metric == "sqeuclidean":
        return sum((fi - ai) ** 2 for fi, ai in zip(f, a))
    dot = sum(fi * ai for fi, ai in zip(f, a))
    nf = math.sqrt(sum(x * x for x in f))
    na = math.sqrt(sum(x * x for x in a))
    return 1.0 - dot / (nf * na)


def ref_loss(features, targets, anchors, metric, scale):
    """The paper's loss, one sample at a time, in Python floats (float64)."""
    total = 0.0
    for f, y in zip(features.tolist(), targets.tolist()):
        z = [-scale * ref_distance(f, a, metric) for a in anchors.tolist()]
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z))
        total += -(z[y] - log_norm)
    return total / len(targets)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "sqeuclidean"])
@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_loss_logits_predict_match_reference(metric, scale):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(17, 6, generator=g, dtype=torch.float64) * 1.5
    targets = torch.randint(0, 5, (17,), generator=g)
    anchors = make_anchors("random", 5, 6, seed=1).double()
    crit = NCMLoss(anchors, metric=metric, scale=scale)
    loss = crit(feats, targets)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss(feats, targets, anchors, metric, scale), abs=1e-6)
    ref_d = torch.tensor(
        [[ref_distance(f, a, metric) for a in anchors.tolist()] for f in feats.tolist()], dtype=torch.float64
    )
    assert torch.allclose(crit.logits(feats), -scale * ref_d, atol=1e-6)
    assert torch.equal(crit.predict(feats), ref_d.argmin(1))


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "sqeuclidean"])
def test_gradcheck(metric):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 2, 1, 3])
    crit = NCMLoss(make_anchors("random", 4, 3, seed=2).double(), metric=metric, scale=2.0)
    assert torch.autograd.gradcheck(lambda f: crit(f, targets), (feats,))


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "sqeuclidean"])
def test_finite_at_anchor_and_at_zero(metric):
    anchors = make_anchors("orthogonal", 3, 4)
    crit = NCMLoss(anchors, metric=metric)
    for feats in (anchors.clone(), torch.zeros(3, 4)):
        feats.requires_grad_(True)
        loss = crit(feats, torch.arange(3))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


def test_euclidean_is_not_squared():
    crit = NCMLoss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), metric="euclidean")
    assert torch.allclose(crit.logits(torch.tensor([[4.0, 0.0]])), -torch.tensor([[3.0, 17**0.5]]))


def test_anchors_are_a_buffer_not_a_parameter():
    anchors = make_anchors("orthogonal", 3, 4)
    crit = NCMLoss(anchors)
    assert list(crit.parameters()) == []
    assert torch.equal(crit.state_dict()["anchors"], anchors)
    assert crit.to(torch.float64).anchors.device == anchors.device  # follows .to()
    with pytest.raises(ValueError):
        NCMLoss(anchors, scale=0.0)


def test_low_precision_features_are_computed_in_fp32():
    crit = NCMLoss(make_anchors("orthogonal", 3, 4))
    out = crit.logits(torch.randn(2, 4).bfloat16())
    assert out.dtype == torch.float32


def test_softmax_head_matches_reference():
    torch.manual_seed(0)
    crit = SoftmaxLoss(5, 3).double()
    feats = torch.randn(8, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (8,))
    w, b = crit.fc.weight, crit.fc.bias
    total = 0.0
    for f, y in zip(feats, targets):
        z = (w @ f + b).tolist()
        total += -(z[y] - math.log(sum(math.exp(v) for v in z)))
    assert crit(feats, targets).item() == pytest.approx(total / 8, abs=1e-9)
    assert [n for n, _ in crit.named_parameters()] == ["fc.weight", "fc.bias"]


def test_build_criterion():
    from ncmcli.config.schema import LossConfig

    a = make_anchors("orthogonal", 3, 4)
    assert isinstance(build_criterion(LossConfig(name="encm"), anchors=a, dim=4, num_classes=3), NCMLoss)
    assert build_criterion(LossConfig(name="cncm"), anchors=a, dim=4, num_classes=3).metric == "cosine"
    assert isinstance(
        build_criterion(LossConfig(name="softmax"), anchors=None, dim=4, num_classes=3), SoftmaxLoss
    )
    with pytest.raises(ValueError):
        build_criterion(LossConfig(name="encm"), anchors=a, dim=5, num_classes=3)


def test_label_smoothing_matches_the_formula_and_is_refused_for_ncm():
    from ncmcli.nn.classifier import Classifier

    cfg = resolve("quickstart-softmax", ["loss.label_smoothing=0.1"])
    _, crit = Classifier.from_config(cfg, 4, (1, 28, 28)).parts()
    crit = crit.double()
    f = torch.randn(6, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logp = F.log_softmax(crit.logits(f), 1)
    eps, c = 0.1, 4
    by_hand = -((1 - eps) * logp.gather(1, y[:, None]).squeeze(1) + eps / c * logp.sum(1)).mean()
    assert crit(f, y).item() == pytest.approx(by_hand.item(), abs=1e-12)
    with pytest.raises(ConfigError, match="label_smoothing applies to"):
        resolve("quickstart", ["loss.label_smoothing=0.1"])


def test_ncm_top_probability_is_bounded_as_the_readme_says():
    from ncmcli import NCMLoss, make_anchors

    a = make_anchors("orthogonal", 10, 16)
    crit = NCMLoss(a)
    on_anchor = torch.softmax(crit.logits(a), 1).max(1).values
    bound = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 9)
    assert on_anchor.max().item() == pytest.approx(bound, rel=1e-5) and bound < 0.33
    far = torch.softmax(crit.logits(torch.randn(200, 16) * 5), 1).max(1).values
    assert far.max().item() <= bound + 1e-6
