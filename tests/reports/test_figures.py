"""ncmcli/figures.py: each plot from a trained quickstart run (conftest's ``quickstart_run``), the
formats, the default locations and the curve labels."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_clean_error, run_ncm
from PIL import Image


@pytest.mark.parametrize(
    "kind,size",
    [("features", (840, 840)), ("confusion", (900, 720)), ("angles", (840, 540)), ("curves", (1440, 540))],
)
@pytest.mark.slow
def test_each_plot_writes_a_valid_png_of_the_expected_size(quickstart_run, tmp_path, kind, size):
    out = tmp_path / f"{kind}.png"
    proc = run_ncm("plot", kind, quickstart_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr and proc.stdout == ""
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == size
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # not blank


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_other_formats_and_default_location(quickstart_run, tmp_path):
    assert (
        run_ncm(
            "plot", "features", quickstart_run, "--format", "svg", "--split", "train", "--max-points", "200"
        ).returncode
        == 0
    )
    assert (quickstart_run / "features-train.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert run_ncm("plot", "confusion", quickstart_run, "--out", tmp_path / "c.pdf").returncode == 0
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    assert_clean_error(
        run_ncm("plot", "angles", quickstart_run, "--format", "gif"), 2, "--format must be one of"
    )


@pytest.mark.slow
def test_plot_without_matplotlib_says_how_to_install(quickstart_run):
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = ['ncm', 'plot', 'features', sys.argv[1]]\n"
        "from ncmcli.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(quickstart_run)], capture_output=True, text=True)
    assert_clean_error(proc, 1, "pip install 'ncmcli[plot]'")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_curves_go_beside_the_run_and_name_only_what_varies(quickstart_run, tmp_path):
    from ncmcli.reports.figures import curve_labels

    proc = run_ncm("plot", "curves", quickstart_run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (quickstart_run / "curves.png").is_file() and not (tmp_path / "curves.png").exists()
    other = tmp_path / "other"
    assert (
        run_ncm(
            "train",
            "--preset",
            "quickstart",
            "--set",
            "train.epochs=1",
            "--set",
            "data.limit_train=300",
            "--set",
            "data.limit_test=100",
            "--set",
            "optim.lr=0.01",
            "--out",
            other,
            "--quiet",
        ).returncode
        == 0
    )
    labels = curve_labels([quickstart_run, other])
    # the limits, lr and epochs differ between the two runs; nothing else is named
    assert labels == [
        "limit_test=300, limit_train=1000, lr=0.05, epochs=2",
        "limit_test=100, limit_train=300, lr=0.01, epochs=1",
    ]
    assert curve_labels([quickstart_run]) == [quickstart_run.name]


def test_curve_labels_spell_out_keys_whose_last_part_is_shared(tmp_path):
    from ncmcli.reports.figures import curve_labels

    runs = []
    for loss, lr in (("encm", 0.1), ("softmax", 0.01)):
        run = tmp_path / loss
        run.mkdir()
        (run / "config.yaml").write_text(f"data:\n  name: mnist\nloss:\n  name: {loss}\noptim:\n  lr: {lr}\n")
        runs.append(run)
    # "name=encm" would not say whose name; lr is unambiguous
    assert curve_labels(runs) == ["loss.name=encm, lr=0.1", "loss.name=softmax, lr=0.01"]


def test_curve_labels_leave_out_loss_keys_a_run_does_not_read(tmp_path):
    from ncmcli.reports.figures import curve_labels

    runs = []
    for i, (loss, scale, gamma) in enumerate((("softmax", 2.0, 0.1), ("encm", 1.0, 0.2), ("encm", 4.0, 0.3))):
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "config.yaml").write_text(
            f"data:\n  name: mnist\nloss:\n  name: {loss}\n  scale: {scale}\n  lambda_gamma: {gamma}\n"
        )
        runs.append(run)
    # lambda_gamma is read by none of them, scale only by E-NCM (where it varies)
    assert curve_labels(runs) == [
        "loss.name=softmax",
        "loss.name=encm, scale=1.0",
        "loss.name=encm, scale=4.0",
    ]


def test_anchors_land_at_their_projected_coordinates():
    import torch

    from ncmcli.reports.figures import feature_layout

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
    two_d = feature_layout(
        feats[:, :2], anchors[:2, :2] * 0 + torch.eye(2, dtype=torch.float64), "anchors", metric="euclidean"
    )
    assert torch.equal(two_d["stars"], torch.eye(2, dtype=torch.float64))  # d = 2: drawn where they are
    cos = feature_layout(feats, anchors, "anchors", metric="cosine")
    assert any("scaled ×" in c for c in cos["caption"])
