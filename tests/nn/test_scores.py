"""ncmcli/scores.py: head/medium/tail metrics and logit adjustment (train-time and post-hoc)
against hand computations, and the open-set scores of `ncm eval --ood` against their
formulas, every AUROC reported, with the warning when a score ranks unknowns as more known
than knowns. (The data.imbalance profiles are in test_data.py.)"""

import json
import math

import pytest
import torch
from conftest import assert_clean_error

from ncmcli.commands.evaluate import _open_set
from ncmcli.config.presets import resolve
from ncmcli.config.schema import LossConfig
from ncmcli.data.subsets import imbalance_counts
from ncmcli.errors import UsageError
from ncmcli.nn import metrics, scores
from ncmcli.nn.criteria import build_criterion
from ncmcli.nn.scores import adjusted_logits, imbalance_metrics


def test_imbalance_metrics_on_a_hand_made_confusion():
    # 6 classes; training counts make classes 0, 1 head, 2, 3 medium, 4, 5 tail.
    counts = [500, 300, 60, 40, 10, 5]
    conf = torch.zeros(6, 6, dtype=torch.int64)
    hits = [9, 8, 5, 4, 2, 1]  # of 10 test images each
    for c, h in enumerate(hits):
        conf[c, c] = h
        conf[c, (c + 1) % 6] = 10 - h
    m = imbalance_metrics(conf, counts)
    assert m["balanced_accuracy"] == pytest.approx(sum(hits) / 60)
    assert m["head_accuracy"] == pytest.approx(17 / 20) and m["medium_accuracy"] == pytest.approx(9 / 20)
    assert m["tail_accuracy"] == pytest.approx(3 / 20)
    assert m["many_shot_accuracy"] == pytest.approx(17 / 20)  # > 100 images: classes 0, 1
    assert m["medium_shot_accuracy"] == pytest.approx(9 / 20)  # 20..100: classes 2, 3
    assert m["few_shot_accuracy"] == pytest.approx(3 / 20)  # < 20: classes 4, 5
    # Unequal test counts: balanced accuracy is the mean recall, not the pooled accuracy.
    conf[0, 0] = 90
    m = imbalance_metrics(conf, None)
    assert m["balanced_accuracy"] == pytest.approx((90 / 91 + sum(hits[1:]) / 10) / 6)
    assert set(m) == {"balanced_accuracy"}
    # C = 10 splits 4 / 3 / 3; ties in count go by label; equal counts have no thirds.
    m = imbalance_metrics(torch.eye(10, dtype=torch.int64), [9] + [5] * 8 + [1])
    assert m["thirds"] == {"head": [0, 1, 2, 3], "medium": [4, 5, 6], "tail": [7, 8, 9]}
    assert set(imbalance_metrics(torch.eye(10, dtype=torch.int64), [5] * 10)) == {"balanced_accuracy"}


@pytest.mark.parametrize("name", ["softmax", "encm", "cncm"])
def test_logit_adjustment_zero_is_exact_and_one_matches_a_hand_computation(name):
    torch.manual_seed(0)
    anchors = torch.eye(4, 6)
    f = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 3, 2, 0])
    counts = torch.tensor([40.0, 30.0, 20.0, 10.0])

    def crit(tau):
        torch.manual_seed(0)
        return build_criterion(
            LossConfig(name=name, logit_adjust=tau),
            anchors=anchors if name != "softmax" else None,
            dim=6,
            num_classes=4,
            prior=counts,
        ).double()

    plain, zero, one = crit(0.0), crit(0.0), crit(1.0)
    assert zero.logit_bias is None
    assert torch.equal(plain(f, y), zero(f, y))
    logits = plain.logits(f)
    ref = 0.0
    for i in range(7):  # -log softmax(z + log pi)_y, one sample at a time
        z = [logits[i, c].item() + math.log(counts[c].item() / 100.0) for c in range(4)]
        ref += (math.log(sum(math.exp(v) for v in z)) - z[y[i]]) / 7
    assert one(f, y).item() == pytest.approx(ref, rel=1e-6)
    assert torch.equal(one.predict(f), plain.predict(f))  # prediction is the plain one


def test_post_hoc_adjustment_subtracts_the_log_prior():
    logits = torch.tensor([[2.0, 1.9], [0.0, 1.0]])
    adj = adjusted_logits(logits, [90, 10], 1.0)
    assert torch.allclose(adj, logits - torch.log(torch.tensor([0.9, 0.1])))
    assert adj.argmax(1).tolist() == [1, 1]  # the rare class wins the close call


def _train(tmp_path, ncm, *sets):
    out = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_test=200",
        "--out",
        out,
        "--json",
    ]
    for s in sets:
        args += ["--set", s]
    proc = ncm(*args)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), proc.stderr


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_train_prints_counts_and_eval_reports_long_tail_metrics(tmp_path, ncm):
    out, res, err = _train(tmp_path, ncm, "data.imbalance=exp:10")
    expected = imbalance_counts(500, 10, "exp", 10.0)
    assert "per class: " + ", ".join(map(str, expected)) in err
    assert list(res["class_counts"].values()) == expected and res["imbalance"] == "exp:10"
    proc = ncm("eval", out, "--json")
    ev = json.loads(proc.stdout)
    for key in (
        "balanced_accuracy",
        "head_accuracy",
        "medium_accuracy",
        "tail_accuracy",
        "many_shot_accuracy",
        "medium_shot_accuracy",
        "few_shot_accuracy",
    ):
        assert key in ev, key
    conf = torch.tensor(ev["confusion"])
    assert ev["balanced_accuracy"] == pytest.approx(imbalance_metrics(conf, expected)["balanced_accuracy"])
    assert list(ev["train_counts"].values()) == expected and ev["imbalance"] == "exp:10"
    # Post-hoc: the predictions are the argmax of logits - tau log prior (checked by hand).
    from ncmcli.data.datasets import load_dataset
    from ncmcli.runs import checkpoint
    from ncmcli.train.forward import evaluate

    adj = json.loads(ncm("eval", out, "--json", "--logit-adjust", "1").stdout)
    ck = checkpoint.load(out / "best.safetensors")
    test = load_dataset(ck.config.data, train=False).test
    e = evaluate(ck.classifier, test, device="cpu", batch_size=256, keep_outputs=True)
    prior = torch.tensor(expected, dtype=torch.float64) / sum(expected)
    pred = (e["logits"].double() - torch.log(prior)).argmax(1)
    assert adj["accuracy"] == pytest.approx((pred == e["labels"]).double().mean().item())
    assert adj["logit_adjust"]["unadjusted_accuracy"] == pytest.approx(ev["accuracy"])
    assert adj["accuracy"] != ev["accuracy"]
    assert_clean_error(ncm("eval", out, "--logit-adjust", "-1"), 2, "--logit-adjust")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_train_time_adjustment_at_zero_trains_identical_weights(tmp_path, ncm):
    from safetensors.torch import load_file

    a, _, _ = _train(tmp_path / "a", ncm, "data.imbalance=step:5", "data.limit_train=400")
    b, res, _ = _train(
        tmp_path / "b", ncm, "data.imbalance=step:5", "data.limit_train=400", "loss.logit_adjust=0"
    )
    c, _, _ = _train(
        tmp_path / "c", ncm, "data.imbalance=step:5", "data.limit_train=400", "loss.logit_adjust=1"
    )
    ta, tb, tc = (load_file(str(p / "last.safetensors")) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith("model."))
    assert not all(torch.equal(ta[k], tc[k]) for k in ta if k.startswith("model."))
    # The adjusted checkpoint rebuilds its prior from the stored counts.
    from ncmcli.runs import checkpoint

    ck = checkpoint.load(c / "best.safetensors")
    counts = torch.tensor(ck.class_counts, dtype=torch.float64)
    assert torch.allclose(ck.criterion.logit_bias.double(), torch.log(counts / counts.sum()), atol=1e-6)


def test_report_groups_by_imbalance(tmp_path):
    from ncmcli.reports.collect import collect

    for name, imb, err in (("a", "exp:10", 30.0), ("b", "exp:100", 40.0), ("c", "exp:100", 42.0)):
        run = tmp_path / name
        run.mkdir()
        cfg = resolve("quickstart", [f"data.imbalance={imb}", f"seed={ord(name)}"])
        from ncmcli.config.overrides import to_yaml

        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "result.json").write_text(
            json.dumps({"status": "completed", "test_error_pct": err, "final": {"test_error_pct": err}})
        )
    cells = collect([tmp_path], by=["data.imbalance"])
    got = {c.settings["data.imbalance"]: sorted(c.errors) for c in cells}
    assert got == {"exp:10": [30.0], "exp:100": [40.0, 42.0]}


def test_each_score_matches_its_formula_per_sample():
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(6, 4, generator=g, dtype=torch.float64) * 3
    logits = -2.0 * dist
    s = scores.ood_scores(logits, dist)
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
    assert set(scores.ood_scores(logits, None)) == {"msp", "maxlogit"}  # no anchors, no distance scores


def test_an_inverted_score_warns_and_names_a_better_one():
    # Knowns sit far from every anchor but much nearer one; unknowns sit near all of them alike:
    # the distance ranks unknowns as more known (AUROC < 0.5), the margin does not.
    d_in = torch.tensor([[5.0, 9.0, 9.0], [6.0, 9.5, 9.0], [5.5, 9.0, 10.0]])
    d_out = torch.tensor([[2.0, 2.1, 2.05], [1.5, 1.6, 1.55]])
    res = _open_set("x", -d_in, d_in, -d_out, d_out, None)
    assert res["score"] == "msp" and res["by_score"]["margin"]["auroc"] == 1.0 == res["auroc"]
    assert res["by_score"]["dist"]["auroc"] == 0.0
    assert any(
        "--ood-score dist has AUROC 0.0000 < 0.5" in w and "try --ood-score margin" in w
        for w in res["warnings"]
    )
    assert all("margin has" not in w for w in res["warnings"])
    # The headline follows --ood-score, and matches the AUROC computed directly.
    res = _open_set("x", -d_in, d_in, -d_out, d_out, "dist")
    assert res["auroc"] == metrics.auroc(-d_in.min(1).values, -d_out.min(1).values)
    with pytest.raises(UsageError, match="anchor model"):
        _open_set("x", -d_in, None, -d_out, None, "margin")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_eval_reports_every_score_and_warns_on_stderr(tmp_path, ncm):
    import json

    from ncmcli.data.fakedata import make_folder

    out = tmp_path / "run"
    assert (
        ncm(
            "train",
            "--preset",
            "quickstart",
            "--set",
            "train.epochs=1",
            "--set",
            "data.limit_train=300",
            "--set",
            "data.limit_test=100",
            "--out",
            out,
        ).returncode
        == 0
    )
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
    assert (
        ncm(
            "train",
            "--preset",
            "quickstart",
            "--set",
            "train.epochs=1",
            "--set",
            "data.limit_train=300",
            "--set",
            "data.limit_test=100",
            "--out",
            out,
        ).returncode
        == 0
    )
    make_folder(tmp_path / "imgs", classes=("a",), per_class=4, size=(28, 28), mode="L")

    def labels(threshold):
        proc = ncm(
            "predict", tmp_path / "imgs", "--checkpoint", out, "--json", "--reject-below-margin", threshold
        )
        assert proc.returncode == 0, proc.stderr
        return [(p["label"], p["second_anchor_margin"]) for p in json.loads(proc.stdout)["predictions"]]

    assert all(label != "unknown" for label, _ in labels("0"))
    assert all(label == "unknown" for label, _ in labels("1e6"))
    mid = sorted(m for _, m in labels("0"))[len(labels("0")) // 2]
    assert all((label == "unknown") == (m < mid) for label, m in labels(str(mid)))
    ev = json.loads(ncm("eval", out, "--json").stdout)["diagnostics"]
    assert ev["reject_below_margin_at_95_tpr"] >= 0
