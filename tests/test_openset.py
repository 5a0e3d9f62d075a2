"""Open-set scores of `ncm eval --ood`: each score against its formula, every AUROC reported,
and the warning when a score ranks unknowns as more known than knowns."""

import math

import pytest
import torch

from ncmcli import diagnostics, scoring
from ncmcli.errors import UsageError
from ncmcli.evaluation import _open_set


def test_each_score_matches_its_formula_per_sample():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(6, 4, generator=g, dtype=torch.float64) * 3
    logits = -2.0 * dist
    s = scoring.ood_scores(logits, dist)
    assert set(s) == {"dist", "margin", "cac", "msp", "maxlogit"}
    for i in range(6):
        d = sorted(dist[i].tolist())
        assert s["dist"][i].item() == pytest.approx(-d[0])
        assert s["margin"][i].item() == pytest.approx(d[1] - d[0])
        softmin = [math.exp(-v) for v in dist[i].tolist()]
        assert s["cac"][i].item() == pytest.approx(-d[0] * (1 - max(softmin) / sum(softmin)))
        z = [math.exp(v) for v in logits[i].tolist()]
        assert s["msp"][i].item() == pytest.approx(max(z) / sum(z))
        assert s["maxlogit"][i].item() == pytest.approx(max(logits[i].tolist()))
    assert set(scoring.ood_scores(logits, None)) == {"msp", "maxlogit"}  # no anchors, no distance scores


def test_an_inverted_score_warns_and_names_a_better_one():
    # Knowns sit far from every anchor but much nearer one; unknowns sit near all of them alike:
    # the distance ranks unknowns as more known (AUROC < 0.5), the margin does not.
    d_in = torch.tensor([[5.0, 9.0, 9.0], [6.0, 9.5, 9.0], [5.5, 9.0, 10.0]])
    d_out = torch.tensor([[2.0, 2.1, 2.05], [1.5, 1.6, 1.55]])
    res = _open_set("x", -d_in, d_in, -d_out, d_out, None)
    assert res["score"] == "msp" and res["by_score"]["margin"]["auroc"] == 1.0 == res["auroc"]
    assert res["by_score"]["dist"]["auroc"] == 0.0
    assert any("--ood-score dist has AUROC 0.0000 < 0.5" in w and "try --ood-score margin" in w
               for w in res["warnings"])
    assert all("margin has" not in w for w in res["warnings"])
    # The headline follows --ood-score, and matches the AUROC computed directly.
    res = _open_set("x", -d_in, d_in, -d_out, d_out, "dist")
    assert res["auroc"] == diagnostics.auroc(-d_in.min(1).values, -d_out.min(1).values)
    with pytest.raises(UsageError, match="anchor model"):
        _open_set("x", -d_in, None, -d_out, None, "margin")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_eval_reports_every_score_and_warns_on_stderr(tmp_path, ncm):
    import json

    from ncmcli.data.fakedata import make_folder

    out = tmp_path / "run"
    assert ncm("train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_train=300",
               "--set", "data.limit_test=100", "--out", out).returncode == 0
    make_folder(tmp_path / "other", classes=("a", "b"), per_class=10, size=(28, 28), mode="L")
    proc = ncm("eval", out, "--ood", tmp_path / "other", "--json")
    res = json.loads(proc.stdout)["ood"]
    assert set(res["by_score"]) == {"dist", "margin", "cac", "msp", "maxlogit"}
    assert res["n_out"] == 20  # a folder with train/ and test/ (20 images each): its test part only
    inverted = [n for n, v in res["by_score"].items() if v["auroc"] < 0.5]
    for name in inverted:
        assert f"--ood-score {name} has AUROC" in proc.stderr
    assert len(res["warnings"]) == len(inverted)
    assert ncm("eval", out, "--ood-score", "marign").stderr.count("did you mean 'margin'") == 1
    res = json.loads(ncm("eval", out, "--ood", tmp_path / "other", "--ood-limit", "7", "--json").stdout)
    assert res["ood"]["n_out"] == 7 and res["n"] == 100  # --ood-limit samples the unknowns only


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_predict_rejects_below_a_margin(tmp_path, ncm):
    import json

    from ncmcli.data.fakedata import make_folder

    out = tmp_path / "run"
    assert ncm("train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_train=300",
               "--set", "data.limit_test=100", "--out", out).returncode == 0
    make_folder(tmp_path / "imgs", classes=("a",), per_class=4, size=(28, 28), mode="L")

    def labels(threshold):
        proc = ncm("predict", tmp_path / "imgs", "--checkpoint", out, "--json", "--reject-below-margin", threshold)
        assert proc.returncode == 0, proc.stderr
        return [(p["label"], p["second_anchor_margin"]) for p in json.loads(proc.stdout)["predictions"]]

    assert all(label != "unknown" for label, _ in labels("0"))
    assert all(label == "unknown" for label, _ in labels("1e6"))
    mid = sorted(m for _, m in labels("0"))[len(labels("0")) // 2]
    assert all((label == "unknown") == (m < mid) for label, m in labels(str(mid)))
    ev = json.loads(ncm("eval", out, "--json").stdout)["diagnostics"]
    assert ev["reject_below_margin_at_95_tpr"] >= 0
