"""``ncm eval`` (ncmcli/evaluation.py): its JSON keys, the diagnostics, open-set against an image
folder with rejection in predict, and what the CLI tests do not cover."""

import json

import numpy as np
import pytest
from conftest import assert_clean_error, run_ncm, untrained_file
from PIL import Image

from ncmcli.config.presets import resolve


def test_eval_honours_the_batch_size(tmp_path, monkeypatch):
    from ncmcli.commands import evaluate as evaluation
    from ncmcli.data.sources import FASHION_CLASSES
    from ncmcli.train import forward

    ck = untrained_file(tmp_path, classes=list(FASHION_CLASSES))
    seen = []
    real = forward.evaluate

    def spy(*a, **k):
        seen.append(k["batch_size"])
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "evaluate", spy)  # the name eval_command calls
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100, batch_size=16)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100)
    assert seen == [16, resolve("quickstart").train.eval_batch_size]


@pytest.mark.slow
def test_eval_json_carries_the_diagnostics(quickstart_run):
    doc = json.loads(run_ncm("eval", quickstart_run, "--json").stdout)
    d = doc["diagnostics"]
    assert 0 <= d["ece_15_bins"] <= 1
    assert d["separation"]["own_voronoi_cell_share"] == pytest.approx(doc["accuracy"])  # the self-check
    assert set(d["compactness"]["per_class"]) == set(doc["classes"])
    assert d["compactness"]["mean"] > 0 and d["reject_above_at_95_tpr"] > d["compactness"]["median"]


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_open_set_against_an_image_folder_and_rejection(quickstart_run, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "noise" / f"{i}.png")
    doc = json.loads(run_ncm("eval", quickstart_run, "--json", "--ood", tmp_path / "noise").stdout)
    ood = doc["ood"]
    assert ood["n_out"] == 40 and 0 <= ood["auroc"] <= 1 and 0 <= ood["fpr_at_95_tpr"] <= 1
    pred = json.loads(
        run_ncm(
            "predict", tmp_path / "noise", "--checkpoint", quickstart_run, "--json", "--reject-above", "1e-6"
        ).stdout
    )
    assert all(p["label"] == "unknown" for p in pred["predictions"])
    keep = json.loads(
        run_ncm(
            "predict", tmp_path / "noise", "--checkpoint", quickstart_run, "--json", "--reject-above", "1e6"
        ).stdout
    )
    assert all(p["label"] != "unknown" for p in keep["predictions"])
    assert_clean_error(run_ncm("eval", quickstart_run, "--ood", tmp_path / "nowhere"), 2, "neither a dataset")
