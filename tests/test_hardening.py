"""Adversarial inputs, one class at a time (RELIABILITY.md lists the guarantees). Every
subprocess runs under a memory cap and a timeout, so that a regression fails fast instead
of taking the machine down or hanging CI."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, save_untrained
from ncmcli.runs import checkpoint
from ncmcli.errors import ConfigError
from ncmcli.config.presets import resolve

CAP = 6 * 2**30  # torch's own import needs about 4 GiB of address space


def capped(*args, timeout=120, cwd=None, stdin=None):
    """``python -m ncmcli ARGS`` under an address-space cap and a timeout."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    env = {k: v for k, v in os.environ.items() if k != "NCM_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ncmcli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit, cwd=cwd, env=env, stdin=stdin)


def _save(tmp_path, preset="quickstart", name="ck.safetensors", classes=None):
    return save_untrained(tmp_path / name, preset, classes=classes)[0]


def _tamper(path, out, *, tensors=None, meta=None):
    t = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        m = dict(fh.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    save_file(t, str(out), metadata=m)
    return out


# -- 2. Validate before allocating ------------------------------------------------------

@pytest.mark.parametrize("meta,fragment", [
    ({"input_shape": "[1, 4096, 4096]"}, "at most 1024"),
    ({"input_shape": "[1, 1024, 1024]"}, "the config implies [32, 524288]"),
    ({"input_shape": "[3, 1024, 1024]", "normalization": json.dumps({"mean": [0.1] * 3, "std": [0.2] * 3}),
      "config": json.dumps({"model": {"arch": "cifar100", "feature_dim": 65536}})}, "parameters, above"),
    ({"classes": json.dumps([f"c{i}" for i in range(100_001)])}, "classes"),
])
def test_crafted_sizes_are_refused_before_anything_is_allocated(tmp_path, meta, fragment):
    bad = _tamper(_save(tmp_path), tmp_path / "bad.safetensors", meta=meta)
    assert bad.stat().st_size < 2_000_000
    assert_clean_error(capped("eval", bad, "--device", "cpu"), 1, fragment)


def test_a_header_shape_that_the_config_does_not_imply_is_refused(tmp_path):
    path = _save(tmp_path)
    bad = _tamper(path, tmp_path / "bad.safetensors", tensors={"model.fc.weight": torch.zeros(32, 7)})
    with pytest.raises(checkpoint.CheckpointError, match=r"model.fc.weight has shape \[32, 7\]"):
        checkpoint.load(bad)


@pytest.mark.parametrize("args,fragment", [
    (["--classes", "1000000", "--dim", "2"], "--classes must be in"),
    (["--classes", "10000", "--dim", "65536"], "classes x dim"),
    (["--classes", "10", "--dim", "0"], "--dim must be in"),
])
def test_anchors_are_bounded(args, fragment):
    assert_clean_error(capped("anchors", *args, timeout=60), 2, fragment)


# -- 3. Numbers that are not numbers ------------------------------------------------------

def _anchors_of(path):
    return load_file(str(path))["anchors"]


@pytest.mark.parametrize("damage,fragment", [
    (lambda a: a.index_fill_(0, torch.tensor([2]), float("nan")), "NaN or infinite"),
    (lambda a: a.index_fill_(0, torch.tensor([2]), float("inf")), "NaN or infinite"),
    (lambda a: a.index_fill_(0, torch.tensor([2]), 0.0), "norm"),
    (lambda a: a * 3, "norm"),
    (lambda a: a.index_copy_(0, torch.tensor([4]), a[3:4].clone()), "coincide"),
])
def test_broken_anchors_are_refused(tmp_path, damage, fragment):
    path = _save(tmp_path)
    bad = _tamper(path, tmp_path / "bad.safetensors", tensors={"anchors": damage(_anchors_of(path).clone())})
    with pytest.raises(checkpoint.CheckpointError, match=fragment):
        checkpoint.load(bad)


def test_nan_weights_and_statistics_are_refused(tmp_path):
    path = _save(tmp_path)
    w = load_file(str(path))["model.fc.weight"].clone()
    w[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="model.fc.weight holds NaN"):
        checkpoint.load(_tamper(path, tmp_path / "w.safetensors", tensors={"model.fc.weight": w}))
    with pytest.raises(checkpoint.CheckpointError, match="mean is not finite"):
        checkpoint.load(_tamper(path, tmp_path / "m.safetensors",
                                meta={"normalization": json.dumps({"mean": [float("nan")], "std": [0.2]})}))


def test_json_output_never_holds_nan_or_infinity():
    from ncmcli.cli.console import strict_json

    doc = strict_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan"})
    assert doc == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan"}
    json.loads(json.dumps(doc, allow_nan=False))


# -- 4. Bounded YAML ----------------------------------------------------------------------

BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    + ["description: *i"])


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1000
    proc = capped("train", "--preset", bomb, "--print-config", timeout=30)
    assert_clean_error(proc, 2, "aliases")


def test_deep_nesting_and_huge_files_are_config_errors(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_clean_error(capped("train", "--preset", deep, "--print-config", timeout=30), 2, "nested deeper")
    deep_map = tmp_path / "deepmap.yaml"
    deep_map.write_text("".join(f"{' ' * i}k{i}:\n" for i in range(40)) + " " * 40 + "x: 1\n")
    assert_clean_error(capped("train", "--preset", deep_map, "--print-config", timeout=30), 2, "nested deeper")
    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * 200_000 + "'\n")
    assert_clean_error(capped("train", "--preset", big, "--print-config", timeout=30), 2, "at most 64 KiB")


def test_error_messages_quote_at_most_about_80_characters(tmp_path):
    huge = "y" * 100_000
    for args in (["--set", f"optim.lr={huge}"], ["--set", f"data.name={huge}"], ["--set", f"{huge}=1"]):
        proc = capped("train", "--preset", "quickstart", "--print-config", *args, timeout=30)
        assert_clean_error(proc, 2)
        assert len(proc.stderr) < 400, len(proc.stderr)
    with pytest.raises(ConfigError) as exc:
        resolve("quickstart", [f"model.arch={huge}"])
    assert len(str(exc.value)) < 400


def test_relative_base_resolves_against_the_presets_own_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.yaml").write_text("train:\n  epochs: 7\n")
    (tmp_path / "sub" / "mine.yaml").write_text("base: [quickstart, ./common.yaml]\nloss:\n  name: cncm\n")
    monkeypatch.chdir(tmp_path)  # not the preset's folder
    cfg = resolve(str(tmp_path / "sub" / "mine.yaml"))
    assert cfg.train.epochs == 7 and cfg.loss.name == "cncm" and cfg.data.name == "quickstart"


# -- 5. Resume integrity ------------------------------------------------------------------

TINY = ["--set", "train.epochs=1", "--set", "data.limit_train=128", "--set", "data.limit_test=64", "--quiet"]


@pytest.fixture
def two_runs(tmp_path):
    for name, extra in (("a", []), ("b", ["--set", "model.arch=small"])):
        proc = capped("train", "--preset", "quickstart", *TINY, *extra, "--out", tmp_path / name, timeout=300)
        assert proc.returncode == 0, proc.stderr
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_resume_refuses_a_hand_edited_config_and_a_foreign_checkpoint(two_runs):
    a, b = two_runs
    text = (a / "config.yaml").read_text()
    (a / "config.yaml").write_text(text.replace("lr: 0.05", "lr: 0.5"))
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config in last")
    (a / "config.yaml").write_text(text)
    (a / "last.safetensors").write_bytes((b / "last.safetensors").read_bytes())  # another run's, another net
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "belongs to another run")
    (a / "config.yaml").write_text(text.split("\n", 1)[1])  # no run id: the config check still holds
    assert_clean_error(capped("train", "--resume", a, "--set", "train.epochs=2"), 1, "differs from the config")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_partial_metrics_line_is_skipped_with_a_note(two_runs):
    a, _ = two_runs
    with open(a / "metrics.jsonl", "a") as fh:
        fh.write('\n{"epoch": 2, "train_lo')
    proc = capped("train", "--resume", a, "--set", "train.epochs=2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped line" in proc.stderr and json.loads(proc.stdout)["final"]["epoch"] == 2


# -- 6. No hangs on special files ---------------------------------------------------------

def test_predict_on_a_fifo_does_not_block(tmp_path):
    ck = _save(tmp_path)
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    proc = capped("predict", fifo, "--checkpoint", ck, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


# -- 7. Images as people see them ---------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from ncmcli.data.images import load_image

    upright = Image.new("L", (8, 12), 0)
    upright.paste(255, (0, 0, 8, 3))  # a white band at the top
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    a, _ = load_image(tmp_path / "upright.png", 1, 12)
    b, _ = load_image(tmp_path / "rotated.jpg", 1, 12)
    assert (a.float() - b.float()).abs().mean() < 8
    plain = stored.copy()
    plain.save(tmp_path / "no-exif.jpg", quality=100)
    c, _ = load_image(tmp_path / "no-exif.jpg", 1, 12)
    assert (a.float() - c.float()).abs().mean() > 40  # the tag is what made the difference


def test_the_pixel_cap_is_the_documented_64_megapixels(tmp_path):
    from PIL import Image

    from ncmcli.errors import ImageError
    from ncmcli.data.images import MAX_IMAGE_PIXELS, load_image

    assert MAX_IMAGE_PIXELS == 64_000_000 and "64 megapixels" in (Path(__file__).parents[1] / "README.md").read_text()
    Image.new("L", (8000, 5000)).save(tmp_path / "40mp.png")
    assert load_image(tmp_path / "40mp.png", 1, 8)[0].shape == (1, 8, 8)
    Image.new("L", (8200, 8000)).save(tmp_path / "65mp.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "65mp.png", 1, 8)


# -- 8. Output that cannot be hijacked ----------------------------------------------------

def test_control_characters_in_names_are_escaped_in_human_output(tmp_path):
    from PIL import Image

    ck = _save(tmp_path, classes=[f"c{i}" if i else "evil\x1b[2J\nFAKE" for i in range(10)])
    img = tmp_path / "a\x1b]0;owned\x07\nb.png"
    Image.new("L", (28, 28), 128).save(img)
    proc = capped("predict", img, "--checkpoint", ck, "--top-k", "10")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\\x1b" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1  # no forged second line
    js = capped("predict", img, "--checkpoint", ck, "--top-k", "10", "--json")
    doc = json.loads(js.stdout)  # JSON keeps the names exactly
    assert doc["predictions"][0]["path"] == str(img)
    assert "evil\x1b[2J\nFAKE" in [t["class"] for t in doc["predictions"][0]["top"]]


def test_rich_markup_in_paths_is_shown_literally(tmp_path):
    folder = tmp_path / "a[/b]" / "[red]x"
    folder.mkdir(parents=True)
    ck = _save(folder, name="best.safetensors")
    proc = capped("predict", tmp_path / "missing[/i].png", "--checkpoint", ck)
    assert_clean_error(proc, 2, "missing[/i].png")
    ev = capped("eval", ck, "--device", "cpu")
    assert "MarkupError" not in ev.stderr and "Traceback" not in ev.stderr


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m ncmcli presets | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 141) and proc.stderr == ""
    closed = subprocess.run(f"{sys.executable} -m ncmcli presets >&-", shell=True, executable="/bin/bash",
                            capture_output=True, text=True, timeout=60)
    assert closed.returncode == 0 and closed.stderr == ""


# -- 9. Signals and bounds ----------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--set", f"seed={2**63}"], "seed must be in"),
    (["--set", "seed=-1"], "seed must be in"),
    (["--set", f"train.num_threads={(os.cpu_count() or 1) + 1}"], "train.num_threads"),
    (["--set", "model.arch=resnet9000"], "model.arch"),
    (["--set", "model.feature_dim=70000"], "model.feature_dim"),
])
def test_config_bounds_are_checked_when_the_config_is_resolved(args, fragment):
    assert_clean_error(capped("train", "--preset", "quickstart", "--print-config", *args, timeout=30), 2, fragment)


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_no_unexpected_errors_for_inputs_a_user_can_give(tmp_path):
    ck = _save(tmp_path)
    for device in ("xla", "meta", "cuda:x", "vulkan"):
        proc = capped("eval", ck, "--device", device)
        assert_clean_error(proc, 2, "device")
    assert_clean_error(capped("anchors", "--classes", "4", "--dim", "4", "--out", tmp_path), 2, "is a folder")
    assert_clean_error(capped("eval", ck, "--limit", "-3"), 2, "--limit")
    assert_clean_error(capped("eval", ck, "--batch-size", "0"), 2, "--batch-size")


def test_eval_honours_the_batch_size(tmp_path, monkeypatch):
    from ncmcli import evaluation, forward
    from ncmcli.data.datasets import FASHION_CLASSES

    ck = _save(tmp_path, classes=list(FASHION_CLASSES))
    seen = []
    real = forward.evaluate

    def spy(*a, **k):
        seen.append(k["batch_size"])
        return real(*a, **k)

    monkeypatch.setattr(forward, "evaluate", spy)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100, batch_size=16)
    evaluation.eval_command(ck, data_root=None, device="cpu", limit=100)
    assert seen == [16, resolve("quickstart").train.eval_batch_size]
