"""``ncm export`` (ncmcli/export.py): ONNX and TorchScript files that match PyTorch and run alone."""

import pytest
import torch

from ncmcli.config.presets import resolve


@pytest.fixture(scope="module")
def trained_ckpts(tmp_path_factory):
    """A briefly trained E-NCM and SoftMax checkpoint (BatchNorm statistics no longer trivial)."""
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    out = {}
    for preset in ("quickstart", "quickstart-softmax"):
        run = tmp_path_factory.mktemp(preset)
        train(
            resolve(preset, ["data.limit_train=256", "data.limit_test=64", "train.epochs=1"]),
            run_dir=run,
            device=torch.device("cpu"),
            reporter=Reporter(),
        )
        out[preset] = run / "best.safetensors"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["quickstart", "quickstart-softmax"])
def test_onnx_and_torchscript_exports_match_pytorch(trained_ckpts, tmp_path, preset):
    import numpy as np
    import onnxruntime as ort

    from ncmcli.commands.export import Exported, export_command
    from ncmcli.runs import checkpoint

    ck_path = trained_ckpts[preset]
    ck = checkpoint.load(ck_path)
    ref_model = Exported(ck.classifier).eval()
    onnx_file, _ = export_command(ck_path, fmt="onnx", out=tmp_path / "m.onnx")
    ts_file, _ = export_command(ck_path, fmt="torchscript", out=tmp_path / "m.pt")
    session = ort.InferenceSession(str(onnx_file))
    scripted = torch.jit.load(str(ts_file))
    for batch in (1, 7, 33):  # the batch size is dynamic
        x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
        with torch.no_grad():
            ref = ref_model(x)
            ts = scripted(x)
        got = session.run(None, {"images": x.numpy()})
        assert len(got) == len(ref) == (3 if preset == "quickstart" else 2)
        for o, t, r in zip(got, ts, ref):
            assert np.abs(o - r.numpy()).max() <= 1e-4 and (t - r).abs().max().item() <= 1e-4
    # The exported prediction is the model's own: nearest anchor (NCM) or argmax (SoftMax).
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    from ncmcli.data.batching import normalize

    with torch.no_grad():
        own = ck.criterion.predict(ck.model(normalize(x, ck.mean, ck.std)))
    assert torch.equal(torch.from_numpy(session.run(None, {"images": x.numpy()})[1]), own)


@pytest.mark.slow
def test_an_exported_onnx_file_runs_without_ncm(trained_ckpts, tmp_path):
    import subprocess
    import sys

    from ncmcli.commands.export import export_command

    f, _ = export_command(trained_ckpts["quickstart"], fmt="onnx", out=tmp_path / "m.onnx")
    code = (
        "import sys; sys.modules['ncmcli'] = None\n"  # any import of ncm would fail
        "import numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(f)!r})\n"
        "out = s.run(None, {'images': np.zeros((3, 1, 28, 28), np.uint8)})\n"
        "print([o.shape for o in out])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[(3, 10), (3,), (3, 10)]"


@pytest.mark.slow
def test_export_cli(cli, trained_ckpts, tmp_path):
    from conftest import assert_clean_error

    proc = cli(
        "export", trained_ckpts["quickstart"].parent, "--format", "torchscript", "--out", tmp_path / "x.pt"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "x.pt") and (tmp_path / "x.pt").stat().st_size > 1000
    assert_clean_error(
        cli("export", trained_ckpts["quickstart"], "--format", "tflite"), 2, "--format must be one of"
    )


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_onnx_metadata_lets_a_client_classify_alone(trained_ckpts, tmp_path, ncm):
    """The ONNX file carries class names, input shape, channel order, resize rule and the
    normalisation: a client with only onnxruntime and PIL reproduces `ncm predict`."""
    import json
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    ck_path = trained_ckpts["quickstart"]
    proc = ncm("export", ck_path, "--out", tmp_path / "m.onnx")
    assert proc.returncode == 0 and "(B, 1, 28, 28) uint8, grayscale" in proc.stderr, proc.stderr
    img = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56), dtype=np.uint8), "L").save(img)
    code = (
        "import sys, json; sys.modules['ncmcli'] = None\n"
        "import numpy as np, onnxruntime as ort\n"
        "from PIL import Image\n"
        f"s = ort.InferenceSession({str(tmp_path / 'm.onnx')!r})\n"
        "meta = s.get_modelmeta().custom_metadata_map\n"
        "classes = json.loads(meta['ncm.classes']); _, c, h, w = json.loads(meta['ncm.input_shape'])\n"
        f"im = Image.open({str(img)!r}).convert('L' if c == 1 else 'RGB')\n"
        "k = h / min(im.size); im = im.resize((max(h, round(im.width * k)), max(h, round(im.height * k))), Image.BILINEAR)\n"
        "l, t = (im.width - w) // 2, (im.height - h) // 2; im = im.crop((l, t, l + w, t + h))\n"
        "x = np.asarray(im, np.uint8).reshape(1, c, h, w)\n"
        "print(json.dumps({'label': classes[int(s.run(None, {'images': x})[1][0])], 'meta': meta}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    client = json.loads(out.stdout)
    assert json.loads(client["meta"]["ncm.classes"])[0] == "T-shirt/top"
    assert "centre crop" in client["meta"]["ncm.resize"] and client["meta"]["ncm.input_dtype"] == "uint8"
    pred = json.loads(ncm("predict", img, "--checkpoint", ck_path, "--json").stdout)["predictions"][0]
    assert client["label"] == pred["label"]


def test_an_unwritable_export_target_is_a_usage_error(tmp_path, cli, tiny_checkpoint, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    proc = cli("export", tiny_checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert proc.returncode == 2 and "permission denied" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()
