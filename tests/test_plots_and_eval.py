"""Plots from a quickstart checkpoint, eval diagnostics, open-set and rejection."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_ncm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "run"
    proc = run_ncm("train", "--preset", "quickstart", "--set", "train.epochs=2", "--set", "data.limit_train=1000",
                   "--set", "data.limit_test=300", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("kind,size", [("features", (840, 840)), ("confusion", (900, 720)),
                                       ("angles", (840, 540)), ("curves", (1440, 540))])
@pytest.mark.slow
def test_each_plot_writes_a_valid_png_of_the_expected_size(run, tmp_path, kind, size):
    out = tmp_path / f"{kind}.png"
    proc = run_ncm("plot", kind, run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr and proc.stdout == ""
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == size
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # not blank


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_other_formats_and_default_location(run, tmp_path):
    assert run_ncm("plot", "features", run, "--format", "svg", "--split", "train", "--max-points", "200").returncode == 0
    assert (run / "features-train.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert run_ncm("plot", "confusion", run, "--out", tmp_path / "c.pdf").returncode == 0
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    assert_clean_error(run_ncm("plot", "angles", run, "--format", "gif"), 2, "--format must be one of")


@pytest.mark.slow
def test_plot_without_matplotlib_says_how_to_install(run):
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['ncm', 'plot', 'features', sys.argv[1]]\n"
            "from ncmcli.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert_clean_error(proc, 1, "pip install 'ncmcli[plot]'")


@pytest.mark.slow
def test_eval_json_carries_the_diagnostics(run):
    doc = json.loads(run_ncm("eval", run, "--json").stdout)
    d = doc["diagnostics"]
    assert 0 <= d["ece_15_bins"] <= 1
    assert d["separation"]["own_voronoi_cell_share"] == pytest.approx(doc["accuracy"])  # the self-check
    assert set(d["compactness"]["per_class"]) == set(doc["classes"])
    assert d["compactness"]["mean"] > 0 and d["reject_above_at_95_tpr"] > d["compactness"]["median"]


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_open_set_against_an_image_folder_and_rejection(run, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "noise" / f"{i}.png")
    doc = json.loads(run_ncm("eval", run, "--json", "--ood", tmp_path / "noise").stdout)
    ood = doc["ood"]
    assert ood["n_out"] == 40 and 0 <= ood["auroc"] <= 1 and 0 <= ood["fpr_at_95_tpr"] <= 1
    pred = json.loads(run_ncm("predict", tmp_path / "noise", "--checkpoint", run, "--json",
                              "--reject-above", "1e-6").stdout)
    assert all(p["label"] == "unknown" for p in pred["predictions"])
    keep = json.loads(run_ncm("predict", tmp_path / "noise", "--checkpoint", run, "--json",
                              "--reject-above", "1e6").stdout)
    assert all(p["label"] != "unknown" for p in keep["predictions"])
    assert_clean_error(run_ncm("eval", run, "--ood", tmp_path / "nowhere"), 2, "neither a dataset")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_curves_go_beside_the_run_and_name_only_what_varies(run, tmp_path):
    from ncmcli.plots import curve_labels

    proc = run_ncm("plot", "curves", run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "curves.png").is_file() and not (tmp_path / "curves.png").exists()
    other = tmp_path / "other"
    assert run_ncm("train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_train=300",
                   "--set", "data.limit_test=100", "--set", "optim.lr=0.01", "--out", other, "--quiet").returncode == 0
    labels = curve_labels([run, other])
    # the limits, lr and epochs differ between the two runs; nothing else is named
    assert labels == ["limit_test=300, limit_train=1000, lr=0.05, epochs=2",
                      "limit_test=100, limit_train=300, lr=0.01, epochs=1"]
    assert curve_labels([run]) == [run.name]


def test_curve_labels_spell_out_keys_whose_last_part_is_shared(tmp_path):
    from ncmcli.plots import curve_labels

    runs = []
    for loss, lr in (("encm", 0.1), ("softmax", 0.01)):
        run = tmp_path / loss
        run.mkdir()
        (run / "config.yaml").write_text(f"data:\n  name: mnist\nloss:\n  name: {loss}\noptim:\n  lr: {lr}\n")
        runs.append(run)
    # "name=encm" would not say whose name; lr is unambiguous
    assert curve_labels(runs) == ["loss.name=encm, lr=0.1", "loss.name=softmax, lr=0.01"]


def test_curve_labels_leave_out_loss_keys_a_run_does_not_read(tmp_path):
    from ncmcli.plots import curve_labels

    runs = []
    for i, (loss, scale, gamma) in enumerate((("softmax", 2.0, 0.1), ("encm", 1.0, 0.2), ("encm", 4.0, 0.3))):
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "config.yaml").write_text(f"data:\n  name: mnist\nloss:\n  name: {loss}\n  scale: {scale}\n"
                                         f"  lambda_gamma: {gamma}\n")
        runs.append(run)
    # lambda_gamma is read by none of them, scale only by E-NCM (where it varies)
    assert curve_labels(runs) == ["loss.name=softmax", "loss.name=encm, scale=1.0", "loss.name=encm, scale=4.0"]


def test_anchors_land_at_their_projected_coordinates():
    import torch

    from ncmcli.plots import feature_layout

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.tensor([9.0, 5, 1, 1, 1, 1]) + 3.0
    anchors = torch.eye(4, 6, dtype=torch.float64)
    lay = feature_layout(feats, anchors, "anchors", metric="euclidean")
    # The PCA by hand: centre, SVD, the two leading directions (up to sign).
    mu = feats.mean(0)
    _, _, vh = torch.linalg.svd(feats - mu, full_matrices=False)
    comps = vh[:2].T
    sign = torch.sign((lay["xy"][:5] * ((feats[:5] - mu) @ comps)).sum(0))
    assert torch.allclose(lay["xy"], ((feats - mu) @ comps) * sign, atol=1e-9)
    assert torch.allclose(lay["stars"], ((anchors - mu) @ comps) * sign, atol=1e-9)
    assert any("true positions" in c for c in lay["caption"])  # feature norms far above 1: said
    two_d = feature_layout(feats[:, :2], anchors[:2, :2] * 0 + torch.eye(2, dtype=torch.float64), "anchors",
                           metric="euclidean")
    assert torch.equal(two_d["stars"], torch.eye(2, dtype=torch.float64))  # d = 2: drawn where they are
    cos = feature_layout(feats, anchors, "anchors", metric="cosine")
    assert any("scaled ×" in c for c in cos["caption"])
