"""``ncm predict`` (ncmcli/predict.py): distances and margins, and files that must not block."""

import os

import pytest
import torch
from conftest import capped, untrained_file


def test_predict_on_a_fifo_does_not_block(tmp_path):
    ck = untrained_file(tmp_path)
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    proc = capped("predict", fifo, "--checkpoint", ck, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_reports_distance_and_margin(tmp_path):
    from conftest import save_untrained
    from PIL import Image

    from ncmcli.commands.predict import predict_command

    ck, model, crit = save_untrained(tmp_path / "ck.safetensors", epoch=1, metrics={})
    Image.new("L", (56, 28), 200).save(tmp_path / "x.png")
    res = predict_command([tmp_path / "x.png"], checkpoint_path=ck, device="cpu")
    rec = res["predictions"][0]
    x = torch.full((1, 1, 28, 28), 200.0)
    with torch.no_grad():
        d = crit.distances(model.eval()((x - 0.3 * 255) / (0.2 * 255))).sort(1).values[0]
    assert rec["nearest_anchor_distance"] == pytest.approx(d[0].item(), abs=1e-5)
    assert rec["second_anchor_margin"] == pytest.approx((d[1] - d[0]).item(), abs=1e-5)
    assert res["resize"] == "crop"
