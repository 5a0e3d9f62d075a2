"""ncmcli/nn/floors.py and loss.scale: auto (the scale whose loss floor is loss.floor_target) and learn (a learned
log s), checked against the floor's formulas, a bisection, a naive loss and the CLI."""

import json
import math

import pytest
import torch
from conftest import assert_clean_error
from safetensors.torch import load_file

from ncmcli.config.presets import resolve
from ncmcli.config.schema import LossConfig
from ncmcli.errors import ConfigError
from ncmcli.nn import floors
from ncmcli.nn.anchors import make_anchors
from ncmcli.nn.criteria import build_criterion
from ncmcli.nn.floors import loss_floor, scale_for_floor
from ncmcli.nn.losses import NCMLoss

ANCHORS = {
    "orthonormal": lambda c: make_anchors("orthogonal", c, c),
    "simplex": lambda c: make_anchors("simplex", c, c - 1),
    "optimized": lambda c: make_anchors("optimized", c, 3, seed=0),
}


@pytest.mark.parametrize("kind", sorted(ANCHORS))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("target", [0.1, 0.5])
def test_auto_scale_puts_the_floor_on_the_target(kind, metric, target):
    anchors = ANCHORS[kind](10)
    s = scale_for_floor(anchors, metric, target)
    assert s > 1
    assert abs(loss_floor(anchors, metric, s) - target) < 1e-6


def test_closed_form_matches_the_issue_numbers_and_a_bisection():
    # s = ln((C - 1) / (e^eps - 1)) / Delta with Delta = sqrt(2) for orthonormal anchors.
    for c, expected in ((10, 3.15), (100, 4.84)):
        s = scale_for_floor(make_anchors("orthogonal", c, c), "euclidean", 0.1)
        assert abs(s - math.log((c - 1) / math.expm1(0.1)) / math.sqrt(2)) < 1e-5
        assert round(s, 2) == pytest.approx(expected, abs=0.011)
    # C-NCM, orthonormal: the gap is sqrt(C / (C - 1)).
    s = scale_for_floor(make_anchors("orthogonal", 10, 10), "cosine", 0.1)
    assert s == pytest.approx(math.log(9 / math.expm1(0.1)) / math.sqrt(10 / 9), rel=1e-9)
    # The closed form agrees with bisecting the floor itself (equiangularity check switched off).
    a = make_anchors("simplex", 10, 9)
    closed = scale_for_floor(a, "euclidean", 0.2)
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if loss_floor(a, "euclidean", mid) > 0.2 else (lo, mid)
    assert closed == pytest.approx(lo, rel=1e-8)


def test_sqncm_auto_uses_the_loss_of_features_on_their_anchors():
    a = make_anchors("orthogonal", 10, 10)
    s = scale_for_floor(a, "sqeuclidean", 0.1)
    logits = -s * torch.cdist(a.double(), a.double()) ** 2
    assert torch.nn.functional.cross_entropy(logits, torch.arange(10)).item() == pytest.approx(0.1, abs=1e-6)


def test_unreachable_targets_are_refused():
    a = make_anchors("orthogonal", 10, 10)
    for bad in (0.0, math.log(10), 5.0):
        with pytest.raises(ValueError, match="log C"):
            scale_for_floor(a, "euclidean", bad)


def test_config_takes_numbers_auto_and_learn():
    assert resolve("quickstart", ["loss.scale=auto"]).loss.scale == "auto"
    assert resolve("quickstart", ["loss.scale=LEARN"]).loss.scale == "learn"
    assert resolve("quickstart", ["loss.scale=4"]).loss.scale == 4.0
    for bad in ("abc", "0", "-1", "1e9", "nan"):
        with pytest.raises(ConfigError):
            resolve("quickstart", [f"loss.scale={bad}"])
    with pytest.raises(ConfigError, match="floor_target"):
        resolve("quickstart", ["loss.floor_target=0"])


def test_learned_scale_is_a_positive_parameter_with_the_right_gradient():
    a = make_anchors("orthogonal", 4, 6)
    crit = build_criterion(LossConfig(name="encm", scale="learn"), anchors=a, dim=6, num_classes=4)
    names = [n for n, _ in crit.named_parameters()]
    assert names == ["log_scale"] and "anchors" not in names
    s0 = scale_for_floor(a, "euclidean", 0.1)
    assert crit.scale_value() == pytest.approx(s0, rel=1e-6)
    f = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    crit.double()
    loss = crit(f, y)
    loss.backward()
    # Naive reference: loss_i = s d_iy + log sum_c exp(-s d_ic), so d loss / d log s =
    # s * mean_i (d_iy - sum_c p_ic d_ic), per sample in float64.
    s = math.exp(crit.log_scale.item())
    ref = 0.0
    for i in range(5):
        d = [math.dist(f[i].tolist(), a[c].double().tolist()) for c in range(4)]
        z = [math.exp(-s * v) for v in d]
        p = [v / sum(z) for v in z]
        ref += s * (d[y[i]] - sum(pc * dc for pc, dc in zip(p, d))) / 5
    assert crit.log_scale.grad.item() == pytest.approx(ref, rel=1e-6)


def test_fixed_scale_is_a_plain_float_and_scale_one_is_the_paper():
    from ncmcli.nn.distances import euclidean

    a = make_anchors("orthogonal", 4, 4)
    f = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    crit = NCMLoss(a, "euclidean", 1.0)
    assert crit.scale == 1.0 and isinstance(crit.scale, float) and not list(crit.parameters())
    assert torch.equal(crit.logits(f), -euclidean(f, a))  # exactly the paper's -||f - a||
    assert torch.equal(NCMLoss(a, "euclidean", 4.0).logits(f), -4.0 * euclidean(f, a))


def _train(tmp_path, name, overrides, stop=None, resume=False):
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    cfg = resolve(
        "quickstart",
        [
            "data.limit_train=256",
            "data.limit_test=64",
            "train.batch_size=64",
            "train.num_threads=1",
            "train.deterministic=true",
            *overrides,
        ],
    )
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    return train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter(), resume=resume, stop=stop)


def test_learned_scale_resumes_bit_identically_and_is_logged(tmp_path):
    from conftest import StopAfter

    from ncmcli.train.stopping import Interrupted

    over = ["loss.scale=learn", "train.epochs=3"]
    result = _train(tmp_path, "straight", over)
    with pytest.raises(Interrupted):
        _train(tmp_path, "resumed", over, stop=StopAfter(6))  # mid-epoch 2
    _train(tmp_path, "resumed", over, resume=True)
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert "criterion.log_scale" in a and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    s_final = math.exp(a["criterion.log_scale"].item())
    assert [ln["epoch"] for ln in lines] == [1, 2, 3] and lines[-1]["scale"] == pytest.approx(
        s_final, rel=1e-6
    )
    assert lines[0]["scale"] != lines[-1]["scale"]  # it did learn
    rec = result["scale"]
    assert rec["setting"] == "learn" and rec["value"] == pytest.approx(s_final, rel=1e-6)
    assert rec["initial"] == pytest.approx(
        scale_for_floor(make_anchors("orthogonal", 10, 32), "euclidean", 0.1)
    )
    assert result["loss_floor"] == pytest.approx(
        loss_floor(make_anchors("orthogonal", 10, 32), "euclidean", s_final)
    )
    # The anchors never moved.
    assert torch.equal(a["anchors"], make_anchors("orthogonal", 10, 32))


def test_learned_scale_takes_no_weight_decay(tmp_path):
    from ncmcli.nn.classifier import Classifier
    from ncmcli.train.schedules import make_optimizer

    cfg = resolve("quickstart", ["loss.scale=learn"])
    model, crit = Classifier.from_config(cfg, 10, (1, 28, 28)).parts()
    opt = make_optimizer(cfg, model, crit)
    groups = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert groups[id(crit.log_scale)] == 0.0
    assert all(groups[id(p)] == cfg.optim.weight_decay for p in model.parameters())


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_auto_scale_everywhere(tmp_path, ncm):
    """train --json reports it; config.yaml notes it; the checkpoint stores it; eval, predict and
    ONNX export all use it."""
    out = tmp_path / "run"
    proc = ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "loss.scale=auto",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=500",
        "--set",
        "data.limit_test=100",
        "--out",
        out,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    s = res["scale"]["value"]
    assert res["scale"]["setting"] == "auto" and s == pytest.approx(
        math.log(9 / math.expm1(0.1)) / math.sqrt(2), rel=1e-4
    )
    assert abs(res["loss_floor"] - 0.1) < 1e-6 and "s = 3.14" in proc.stderr
    assert f"resolved to {s:.6g}" in (out / "config.yaml").read_text()
    from ncmcli.runs import checkpoint

    ck = checkpoint.load(out / "best.safetensors")
    assert ck.criterion.scale_value() == s
    ev = json.loads(ncm("eval", out, "--json").stdout)
    assert ev["scale"] == s
    from ncmcli.data.fakedata import make_folder

    make_folder(tmp_path / "imgs", classes=("a",), per_class=1, size=(28, 28), mode="L")
    pred = json.loads(
        ncm(
            "predict", tmp_path / "imgs", "--checkpoint", out / "best.safetensors", "--json", "--top-k", "10"
        ).stdout
    )
    top = pred["predictions"][0]
    # softmax(-s d): the top class's probability over the second's is exp(s * margin).
    p = [t["prob"] for t in top["top"]]
    assert math.log(p[0] / p[1]) == pytest.approx(s * top["second_anchor_margin"], rel=1e-3, abs=1e-3)
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    onnx_path = tmp_path / "m.onnx"
    assert ncm("export", out, "--out", onnx_path).returncode == 0
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    logits, _, dist = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"images": x})
    assert np.allclose(logits, -s * dist, atol=1e-4)


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_anchors_command_prints_floor_and_top_probability_at_auto(ncm):
    res = json.loads(
        ncm("anchors", "-C", "10", "-d", "10", "--method", "orthogonal", "--scale", "auto", "--json").stdout
    )
    assert res["scale_setting"] == "auto" and abs(res["loss_floor"] - 0.1) < 1e-6
    assert res["top_probability"] == pytest.approx(math.exp(-0.1), abs=1e-6)
    res = json.loads(ncm("anchors", "-C", "10", "-d", "10", "--method", "orthogonal", "--json").stdout)
    assert res["scale"] == 1.0 and res["top_probability"] == pytest.approx(
        math.exp(-math.log1p(9 * math.exp(-math.sqrt(2))))
    )
    assert_clean_error(ncm("anchors", "-C", "10", "-d", "10", "--scale", "fast"), 2, "--scale")
    assert_clean_error(
        ncm("anchors", "-C", "10", "-d", "10", "--scale", "auto", "--floor-target", "3"), 2, "log C"
    )


def test_scale_floor_cache_stays_bounded():
    a = make_anchors("optimized", 6, 3, seed=1)
    scale_for_floor(a, "cosine", 0.2)
    assert len(floors._CACHE) <= floors._CACHE_SIZE
