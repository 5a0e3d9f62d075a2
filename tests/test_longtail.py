"""Long-tailed data: data.imbalance profiles, head/medium/tail metrics, and logit adjustment
(train-time and post-hoc), against the published counts and hand computations."""

import json
import math

import pytest
import torch

from conftest import assert_clean_error
from ncmcli.config.schema import LossConfig
from ncmcli.errors import ConfigError
from ncmcli.data.subsets import imbalance_counts, imbalanced_indices
from ncmcli.nn.losses import build_criterion
from ncmcli.config.presets import resolve
from ncmcli.scoring import adjusted_logits, imbalance_metrics

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # Cao et al.'s CIFAR-10-LT, 12,406


def test_exp_profile_matches_cao_et_al_on_cifar10_shaped_labels():
    labels = torch.arange(10).repeat_interleave(5000)[torch.randperm(50000, generator=torch.Generator().manual_seed(3))]
    idx = imbalanced_indices(labels, 10, "exp", 100.0, seed=0)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == CIFAR10_LT_100 and len(idx) == 12406
    assert imbalance_counts(5000, 10, "exp", 100.0) == CIFAR10_LT_100
    # Seeded: the same seed picks the same images, another seed others.
    assert torch.equal(idx, imbalanced_indices(labels, 10, "exp", 100.0, seed=0))
    assert not torch.equal(idx, imbalanced_indices(labels, 10, "exp", 100.0, seed=1))
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)


def test_step_profile_and_small_classes():
    assert imbalance_counts(1000, 10, "step", 10.0) == [1000] * 5 + [100] * 5
    assert imbalance_counts(1000, 5, "step", 4.0) == [1000, 1000, 250, 250, 250]
    # A class with fewer images than its share keeps them all; none vanishes.
    labels = torch.tensor([0] * 100 + [1] * 3 + [2] * 50)
    counts = torch.bincount(labels[imbalanced_indices(labels, 3, "exp", 1000.0)], minlength=3).tolist()
    assert counts == [100, 3, 1]


def test_imbalance_config_is_checked():
    assert resolve("quickstart", ["data.imbalance=exp:100"]).data.imbalance == "exp:100"
    for bad in ("exp", "exp:0.5", "log:10", "step:x", "exp:1e9"):
        with pytest.raises(ConfigError, match="data.imbalance"):
            resolve("quickstart", [f"data.imbalance={bad}"])
    with pytest.raises(ConfigError, match="logit_adjust applies"):
        resolve("quickstart", ["loss.name=hinge", "loss.logit_adjust=1"])


def test_imbalance_applies_after_limit_and_before_a_stratified_validation_split():
    from ncmcli.data.datasets import load_dataset

    cfg = resolve("quickstart", ["data.limit_train=2000", "data.imbalance=exp:10", "data.val_split=0.1"]).data
    ds = load_dataset(cfg)
    total = [a + b for a, b in zip(ds.train_counts, torch.bincount(ds.val.labels, minlength=10).tolist())]
    assert total == imbalance_counts(200, 10, "exp", 10.0)  # n_max = the largest class after the limit
    val = torch.bincount(ds.val.labels, minlength=10).tolist()
    assert sum(val) == round(0.1 * sum(total)) and val[0] > val[-1]  # stratified: the tail stays a tail
    assert torch.bincount(ds.test.labels, minlength=10).tolist() == [100] * 10  # the test split stays balanced
    assert any("long-tailed (exp:10" in n for n in ds.notes)


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
        return build_criterion(LossConfig(name=name, logit_adjust=tau), anchors=anchors if name != "softmax" else None,
                               dim=6, num_classes=4, prior=counts).double()

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
    args = ["train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_test=200",
            "--out", out, "--json"]
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
    for key in ("balanced_accuracy", "head_accuracy", "medium_accuracy", "tail_accuracy",
                "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy"):
        assert key in ev, key
    conf = torch.tensor(ev["confusion"])
    assert ev["balanced_accuracy"] == pytest.approx(imbalance_metrics(conf, expected)["balanced_accuracy"])
    assert list(ev["train_counts"].values()) == expected and ev["imbalance"] == "exp:10"
    # Post-hoc: the predictions are the argmax of logits - tau log prior (checked by hand).
    from ncmcli.runs import checkpoint
    from ncmcli.data.datasets import load_dataset
    from ncmcli.forward import evaluate

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
    b, res, _ = _train(tmp_path / "b", ncm, "data.imbalance=step:5", "data.limit_train=400", "loss.logit_adjust=0")
    c, _, _ = _train(tmp_path / "c", ncm, "data.imbalance=step:5", "data.limit_train=400", "loss.logit_adjust=1")
    ta, tb, tc = (load_file(str(p / "last.safetensors")) for p in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith("model."))
    assert not all(torch.equal(ta[k], tc[k]) for k in ta if k.startswith("model."))
    # The adjusted checkpoint rebuilds its prior from the stored counts.
    from ncmcli.runs import checkpoint

    ck = checkpoint.load(c / "best.safetensors")
    counts = torch.tensor(ck.class_counts, dtype=torch.float64)
    assert torch.allclose(ck.criterion.logit_bias.double(), torch.log(counts / counts.sum()), atol=1e-6)


def test_report_groups_by_imbalance(tmp_path):
    from ncmcli.report import collect

    for name, imb, err in (("a", "exp:10", 30.0), ("b", "exp:100", 40.0), ("c", "exp:100", 42.0)):
        run = tmp_path / name
        run.mkdir()
        cfg = resolve("quickstart", [f"data.imbalance={imb}", f"seed={ord(name)}"])
        from ncmcli.config.overrides import to_yaml

        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "result.json").write_text(json.dumps({"status": "completed", "test_error_pct": err,
                                                     "final": {"test_error_pct": err}}))
    cells = collect([tmp_path], by=["data.imbalance"])
    got = {c.settings["data.imbalance"]: sorted(c.errors) for c in cells}
    assert got == {"exp:10": [30.0], "exp:100": [40.0, 42.0]}
