"""Extensions beside the paper (issue 15): richer eval metrics, warmup, AdamW and Nesterov,
label smoothing, and predict's distance margin and aspect-keeping resize."""

import math

import pytest
import torch
import torch.nn.functional as F

from ncmcli import diagnostics
from ncmcli.errors import ConfigError
from ncmcli.config.presets import resolve
from ncmcli.train.schedules import Warmup, make_optimizer, make_scheduler


def test_per_class_scores_against_a_hand_count():
    # rows: true class, columns: predicted
    confusion = [[5, 1, 0, 0],
                 [2, 3, 1, 0],
                 [0, 0, 4, 0],
                 [0, 0, 0, 0]]  # class 3: no images, never predicted
    rows, macro = diagnostics.per_class_scores(confusion)
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
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3],
                           [1.0, 2, 3, 4, 5, 6, 7],
                           [0.0, 0, 0, 0, 0, 9, 1]])
    labels = torch.tensor([4, 0, 6])
    # row 0: label 4 is 5th largest -> in top 5; row 1: label 0 is smallest -> not; row 2: 6 is 2nd -> in
    assert diagnostics.topk_accuracy(logits, labels, 5) == pytest.approx(2 / 3)
    assert diagnostics.topk_accuracy(logits, labels, 1) == 0.0


def test_warmup_ramps_then_hands_over_to_the_schedule():
    cfg = resolve("quickstart", ["optim.schedule=multistep", "optim.milestones=6", "optim.milestone_unit=step",
                                 "optim.lr=0.1", "optim.warmup_epochs=0.4"])
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2), torch.nn.Identity())
    sched, per_step = make_scheduler(cfg, opt, steps_per_epoch=10)
    warm = Warmup(opt, round(cfg.optim.warmup_epochs * 10))
    used = []
    for step in range(8):
        warm.step(step, lambda: (used.append(opt.param_groups[0]["lr"]), opt.step()))
        sched.step()
    assert used == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule's lr, not the warmed one


def test_adamw_and_nesterov():
    model = torch.nn.Linear(3, 2)
    adamw = make_optimizer(resolve("quickstart", ["optim.name=adamw", "optim.betas=0.8,0.99", "optim.lr=0.001"]),
                           model, torch.nn.Identity())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.99)
    sgd = make_optimizer(resolve("quickstart", ["optim.nesterov=true"]), model, torch.nn.Identity())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    with pytest.raises(ConfigError, match="nesterov"):
        resolve("quickstart", ["optim.nesterov=true", "optim.name=adamw"])
    with pytest.raises(ConfigError, match="betas"):
        resolve("quickstart", ["optim.name=adamw", "optim.betas=0.9"])


def test_label_smoothing_matches_the_formula_and_is_refused_for_ncm():
    from ncmcli.nn.classifier import Classifier

    cfg = resolve("quickstart-softmax", ["loss.label_smoothing=0.1"])
    _, crit = Classifier.from_config(cfg, 4, (1, 28, 28)).parts()
    crit = crit.double()
    f = torch.randn(6, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logp = F.log_softmax(crit.logits(f), 1)
    eps, c = 0.1, 4
    by_hand = -((1 - eps) * logp.gather(1, y[:, None]).squeeze(1) + eps / c * logp.sum(1)).mean()
    assert crit(f, y).item() == pytest.approx(by_hand.item(), abs=1e-12)
    with pytest.raises(ConfigError, match="label_smoothing applies to"):
        resolve("quickstart", ["loss.label_smoothing=0.1"])


def test_ncm_top_probability_is_bounded_as_the_readme_says():
    from ncmcli import NCMLoss, make_anchors

    a = make_anchors("orthogonal", 10, 16)
    crit = NCMLoss(a)
    on_anchor = torch.softmax(crit.logits(a), 1).max(1).values
    bound = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 9)
    assert on_anchor.max().item() == pytest.approx(bound, rel=1e-5) and bound < 0.33
    far = torch.softmax(crit.logits(torch.randn(200, 16) * 5), 1).max(1).values
    assert far.max().item() <= bound + 1e-6


def test_crop_resize_keeps_the_aspect_ratio(tmp_path):
    from PIL import Image

    from ncmcli.data.images import load_image

    im = Image.new("L", (40, 20), 0)
    im.paste(255, (10, 0, 30, 20))  # a white square in the middle of a wide image
    im.save(tmp_path / "wide.png")
    crop, _ = load_image(tmp_path / "wide.png", 1, 10, "crop")
    squash, _ = load_image(tmp_path / "wide.png", 1, 10, "squash")
    assert crop.float().mean() > 240  # the centre crop is the white square
    assert 100 < squash.float().mean() < 160  # squashing keeps the black sides


def test_predict_reports_distance_and_margin(tmp_path):
    from PIL import Image

    from conftest import save_untrained
    from ncmcli.predict import predict_command

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


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_piped_progress_prints_periodic_lines_with_an_eta(ncm, tmp_path):
    import re

    proc = ncm("train", "--preset", "quickstart", "--set", "train.epochs=2", "--set", "data.limit_train=1500",
               "--set", "data.limit_test=100", "--out", tmp_path / "r", "--log-every", "0.2")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if re.match(r"epoch \d+/2 step \d+/\d+ .* ETA \d+:\d\d:\d\d$", ln)]
    assert len(lines) >= 2, proc.stderr  # several lines within the run, not one per epoch
    quiet = ncm("train", "--preset", "quickstart", "--set", "train.epochs=1", "--set", "data.limit_train=300",
                "--set", "data.limit_test=100", "--out", tmp_path / "q", "--log-every", "0.2", "--quiet")
    assert "ETA" not in quiet.stderr


def _ema_run(tmp_path, name, epochs, resume=False, stop=None):
    from ncmcli.engine import Reporter
    from ncmcli.train.loop import train

    cfg = resolve("quickstart-softmax", ["data.limit_train=256", "data.limit_test=64", "train.batch_size=64",
                                         "train.deterministic=true", "train.num_threads=1", "model.dropout=0.2",
                                         "train.ema_decay=0.9", f"train.epochs={epochs}"])
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    return train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter(), resume=resume, stop=stop)


def test_ema_weights_follow_the_formula_and_are_what_is_checkpointed(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ncmcli.train import loop as training

    seen = []
    real = training.update_ema

    def spy(run):
        seen.append({k: v.detach().clone() for k, v in run.criterion.named_parameters()})  # the live head
        real(run)

    monkeypatch.setattr(training, "update_ema", spy)
    _ema_run(tmp_path, "a", 1)
    d, ema = 0.9, None
    for w in seen:  # the first update copies; then e = d e + (1 - d) w
        ema = {k: v.clone() for k, v in w.items()} if ema is None else {k: d * ema[k] + (1 - d) * w[k] for k in w}
    saved = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert len(seen) == 4
    for k, v in ema.items():
        assert torch.allclose(saved[f"criterion.{k}"], v, atol=1e-6)
        assert not torch.allclose(saved[f"state.raw.criterion.{k}"], v)  # the live weights differ


def test_ema_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from conftest import StopAfter

    from ncmcli.train.loop import Interrupted

    _ema_run(tmp_path, "straight", 3)
    with pytest.raises(Interrupted):
        _ema_run(tmp_path, "resumed", 3, stop=StopAfter(6))  # stops mid-epoch 2
    _ema_run(tmp_path, "resumed", 3, resume=True)
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("state.raw.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch,size", [("resnet18-cifar", 32), ("resnet18", 64)])
def test_resnet_backbones_give_the_feature_dim_and_train_a_step(arch, size):
    from ncmcli.train.schedules import make_optimizer
    from ncmcli.nn.classifier import Classifier

    for loss in ("encm", "softmax"):
        cfg = resolve(f"quickstart{'' if loss == 'encm' else '-softmax'}",
                      [f"model.arch={arch}", "model.feature_dim=64"])
        torch.manual_seed(0)
        model, crit = Classifier.from_config(cfg, 10, (3, size, size)).parts()
        assert model.feature_dim == 64
        x, y = torch.randn(4, 3, size, size), torch.arange(4)
        assert model(x).shape == (4, 64)
        opt = make_optimizer(cfg, model, crit)
        before = model.fc.weight.detach().clone()
        loss_value = crit(model(x), y)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        assert torch.isfinite(loss_value) and not torch.equal(before, model.fc.weight)
    small = Classifier.from_config(resolve("quickstart", ["model.arch=resnet34-cifar"]), 10, (1, 32, 32)).net
    assert small.body.conv1.kernel_size == (3, 3) and small.feature_dim == 512


def test_pretrained_weights_offline_give_one_line_saying_where_to_put_the_file(tmp_path, monkeypatch):
    import torch.hub

    from ncmcli.nn.models import build_net

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as exc:
        build_net("resnet18", in_channels=3, image_size=64, pretrained=True)
    msg = str(exc.value)
    assert "\n" not in msg and "resnet18-" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(ConfigError, match="applies to the ResNets"):
        build_net("tiny", in_channels=1, image_size=28, pretrained=True)


@pytest.fixture(scope="module")
def trained_ckpts(tmp_path_factory):
    """A briefly trained E-NCM and SoftMax checkpoint (BatchNorm statistics no longer trivial)."""
    from ncmcli.engine import Reporter
    from ncmcli.train.loop import train

    out = {}
    for preset in ("quickstart", "quickstart-softmax"):
        run = tmp_path_factory.mktemp(preset)
        train(resolve(preset, ["data.limit_train=256", "data.limit_test=64", "train.epochs=1"]), run_dir=run,
              device=torch.device("cpu"), reporter=Reporter())
        out[preset] = run / "best.safetensors"
    return out


@pytest.mark.parametrize("preset", ["quickstart", "quickstart-softmax"])
def test_onnx_and_torchscript_exports_match_pytorch(trained_ckpts, tmp_path, preset):
    import numpy as np
    import onnxruntime as ort

    from ncmcli.runs import checkpoint
    from ncmcli.engine import export_command
    from ncmcli.export import Exported

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


def test_an_exported_onnx_file_runs_without_ncm(trained_ckpts, tmp_path):
    import subprocess
    import sys

    from ncmcli.engine import export_command

    f, _ = export_command(trained_ckpts["quickstart"], fmt="onnx", out=tmp_path / "m.onnx")
    code = ("import sys; sys.modules['ncmcli'] = None\n"  # any import of ncm would fail
            "import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(f)!r})\n"
            "out = s.run(None, {'images': np.zeros((3, 1, 28, 28), np.uint8)})\n"
            "print([o.shape for o in out])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[(3, 10), (3,), (3, 10)]"


def test_export_cli(ncm, trained_ckpts, tmp_path):
    from conftest import assert_clean_error

    proc = ncm("export", trained_ckpts["quickstart"].parent, "--format", "torchscript", "--out", tmp_path / "x.pt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "x.pt") and (tmp_path / "x.pt").stat().st_size > 1000
    assert_clean_error(ncm("export", trained_ckpts["quickstart"], "--format", "tflite"), 2, "--format must be one of")


def test_tensorboard_scalars_mirror_metrics_jsonl(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ncmcli.engine import Reporter
    from ncmcli.train.loop import train

    cfg = resolve("quickstart", ["data.limit_train=256", "data.limit_test=64", "train.epochs=2",
                                 "train.tensorboard=true"])
    train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/train_loss", "test/test_acc", "optim/lr", "optim/images_per_s",
            "features/compactness_mean_own_distance", "features/separation_mean_nearest_other"} <= tags
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in acc.Scalars("test/test_acc")]
    assert logged == [(m["epoch"], pytest.approx(m["test_acc"], abs=1e-6)) for m in lines]


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
    code = ("import sys, json; sys.modules['ncmcli'] = None\n"
            "import numpy as np, onnxruntime as ort\n"
            "from PIL import Image\n"
            f"s = ort.InferenceSession({str(tmp_path / 'm.onnx')!r})\n"
            "meta = s.get_modelmeta().custom_metadata_map\n"
            "classes = json.loads(meta['ncm.classes']); _, c, h, w = json.loads(meta['ncm.input_shape'])\n"
            f"im = Image.open({str(img)!r}).convert('L' if c == 1 else 'RGB')\n"
            "k = h / min(im.size); im = im.resize((max(h, round(im.width * k)), max(h, round(im.height * k))), Image.BILINEAR)\n"
            "l, t = (im.width - w) // 2, (im.height - h) // 2; im = im.crop((l, t, l + w, t + h))\n"
            "x = np.asarray(im, np.uint8).reshape(1, c, h, w)\n"
            "print(json.dumps({'label': classes[int(s.run(None, {'images': x})[1][0])], 'meta': meta}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    client = json.loads(out.stdout)
    assert json.loads(client["meta"]["ncm.classes"])[0] == "T-shirt/top"
    assert "centre crop" in client["meta"]["ncm.resize"] and client["meta"]["ncm.input_dtype"] == "uint8"
    pred = json.loads(ncm("predict", img, "--checkpoint", ck_path, "--json").stdout)["predictions"][0]
    assert client["label"] == pred["label"]
