import pytest
import torch

from ncmcli.nn import metrics
from ncmcli.nn.metrics import anchor_report, auroc, expected_calibration_error, fpr_at_tpr, pca_2d


def test_auroc_known_answers():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(500, generator=g) + 10.0
    neg = torch.randn(500, generator=g)
    assert auroc(pos, neg) == pytest.approx(1.0, abs=1e-6)
    assert auroc(neg, pos) == pytest.approx(0.0, abs=1e-6)
    same = torch.randn(2000, generator=g)
    assert auroc(same[:1000], same[1000:]) == pytest.approx(0.5, abs=0.04)
    assert auroc(torch.ones(10), torch.ones(7)) == pytest.approx(0.5)  # all ties count half
    # A hand-counted case: pairs (p > n): 3 > 1, 3 > 2, 2 > 1, 2 = 2 (half) -> 3.5 / 4
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(3.5 / 4)


def test_fpr_at_95_tpr():
    pos = torch.arange(100, dtype=torch.float64)  # accept the top 95%: threshold near 5
    neg = torch.tensor([0.0, 10.0, 50.0, 99.0])
    fpr, thr = fpr_at_tpr(pos, neg, 0.95)
    assert thr == pytest.approx(4.95) and fpr == pytest.approx(0.75)


def test_ece_hand_computed():
    # Two bins used: conf 0.9 (3 samples, 2 right) and conf 0.6 (2 samples, 2 right).
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 0, 1])
    expected = 3 / 5 * abs(2 / 3 - 0.9) + 2 / 5 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)  # float32 probs
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_anchor_report_on_constructed_distances():
    dist = torch.tensor([[0.1, 1.0, 2.0], [0.5, 0.2, 0.9], [0.3, 0.4, 0.1], [0.0, 0.7, 0.6]])
    labels = torch.tensor([0, 1, 2, 1])  # the last one sits in class 0's cell
    rep = anchor_report(dist, labels, ["a", "b", "c"])
    assert rep["compactness"]["mean"] == pytest.approx((0.1 + 0.2 + 0.1 + 0.7) / 4)
    assert rep["compactness"]["per_class"]["b"]["mean"] == pytest.approx(0.45)
    assert rep["separation"]["mean_nearest_other_anchor"] == pytest.approx((1.0 + 0.5 + 0.3 + 0.0) / 4)
    assert rep["separation"]["own_voronoi_cell_share"] == pytest.approx(0.75)


def test_pca_finds_the_dominant_plane():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(400, 5)
    x[:, 2] = torch.randn(400, generator=g) * 10
    x[:, 4] = torch.randn(400, generator=g) * 3
    x[:, 0] = torch.randn(400, generator=g) * 0.01
    _, comps, ratio = pca_2d(x)
    assert abs(comps[2, 0]) == pytest.approx(1.0, abs=1e-3) and abs(comps[4, 1]) == pytest.approx(
        1.0, abs=1e-3
    )
    assert sum(ratio) > 0.99


def test_per_class_scores_against_a_hand_count():
    # rows: true class, columns: predicted
    confusion = [
        [5, 1, 0, 0],
        [2, 3, 1, 0],
        [0, 0, 4, 0],
        [0, 0, 0, 0],
    ]  # class 3: no images, never predicted
    rows, macro = metrics.per_class_scores(confusion)
    # class 0: precision 5/7, recall 5/6; class 1: 3/4, 3/6; class 2: 4/5, 4/4
    p = [5 / 7, 3 / 4, 4 / 5]
    r = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r)]
    for c in range(3):
        assert rows[c]["precision"] == pytest.approx(p[c]) and rows[c]["recall"] == pytest.approx(r[c])
        assert rows[c]["f1"] == pytest.approx(f1[c])
    assert rows[3] == {"precision": None, "recall": None, "f1": None, "n": 0}
    assert macro == pytest.approx(sum(f1) / 3)  # over the classes that have images


def test_topk_against_a_hand_count():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [1.0, 2, 3, 4, 5, 6, 7], [0.0, 0, 0, 0, 0, 9, 1]])
    labels = torch.tensor([4, 0, 6])
    # row 0: label 4 is 5th largest -> in top 5; row 1: label 0 is smallest -> not; row 2: 6 is 2nd -> in
    assert metrics.topk_accuracy(logits, labels, 5) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(logits, labels, 1) == 0.0
