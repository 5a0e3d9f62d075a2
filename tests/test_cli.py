"""What the command line promises whatever it is given: one JSON document on stdout, names escaped
in human output, progress lines when piped, a quiet end on a closed pipe, and one-line errors for
every input a user can type (RELIABILITY.md); and ``ncm anchors``: certificates, --json and
--out, bounds, and a help that does not import torch."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_clean_error, capped, untrained_file
from safetensors import safe_open
from safetensors.torch import load_file


def test_json_output_never_holds_nan_or_infinity():
    from ncmcli.cli.console import strict_json

    doc = strict_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan"})
    assert doc == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan"}
    json.loads(json.dumps(doc, allow_nan=False))


@pytest.mark.slow
def test_control_characters_in_names_are_escaped_in_human_output(tmp_path):
    from PIL import Image

    ck = untrained_file(tmp_path, classes=[f"c{i}" if i else "evil\x1b[2J\nFAKE" for i in range(10)])
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


@pytest.mark.slow
def test_rich_markup_in_paths_is_shown_literally(tmp_path):
    folder = tmp_path / "a[/b]" / "[red]x"
    folder.mkdir(parents=True)
    ck = untrained_file(folder, name="best.safetensors")
    proc = capped("predict", tmp_path / "missing[/i].png", "--checkpoint", ck)
    assert_clean_error(proc, 2, "missing[/i].png")
    ev = capped("eval", ck, "--device", "cpu")
    assert "MarkupError" not in ev.stderr and "Traceback" not in ev.stderr


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m ncmcli presets | head -c 1 >/dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 141) and proc.stderr == ""
    closed = subprocess.run(
        f"{sys.executable} -m ncmcli presets >&-",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert closed.returncode == 0 and closed.stderr == ""


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_no_unexpected_errors_for_inputs_a_user_can_give(tmp_path):
    ck = untrained_file(tmp_path)
    for device in ("xla", "meta", "cuda:x", "vulkan"):
        proc = capped("eval", ck, "--device", device)
        assert_clean_error(proc, 2, "device")
    assert_clean_error(capped("anchors", "--classes", "4", "--dim", "4", "--out", tmp_path), 2, "is a folder")
    assert_clean_error(capped("eval", ck, "--limit", "-3"), 2, "--limit")
    assert_clean_error(capped("eval", ck, "--batch-size", "0"), 2, "--batch-size")


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_piped_progress_prints_periodic_lines_with_an_eta(ncm, tmp_path):
    import re

    proc = ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=2",
        "--set",
        "data.limit_train=1500",
        "--set",
        "data.limit_test=100",
        "--out",
        tmp_path / "r",
        "--log-every",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [
        ln
        for ln in proc.stderr.splitlines()
        if re.match(r"epoch \d+/2 step \d+/\d+ .* ETA \d+:\d\d:\d\d$", ln)
    ]
    assert len(lines) >= 2, proc.stderr  # several lines within the run, not one per epoch
    quiet = ncm(
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
        tmp_path / "q",
        "--log-every",
        "0.2",
        "--quiet",
    )
    assert "ETA" not in quiet.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--bogus"),
        ("eval", "/no/such/checkpoint"),
        ("anchors", "-C", "1", "-d", "2"),
        ("--version",),
    ],
)
def test_the_in_process_cli_matches_the_real_one(ncm, cli, args):
    """CliRunner-driven tests stand in for subprocesses: same exit code, stdout and stderr."""
    real, here = ncm(*args), cli(*args)
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)


@pytest.mark.parametrize(
    "args,angle",
    [
        (["--classes", 10, "--dim", 2, "--method", "polar"], "36.00°"),
        (["--classes", 10, "--dim", 9, "--method", "simplex"], "96.38°"),
        (["--classes", 100, "--dim", 64, "--method", "auto"], "90.00°"),
    ],
)
def test_anchor_certificates(cli, args, angle):
    proc = cli("anchors", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"min angle        │ {angle}" in proc.stdout


def test_auto_names_the_method_it_chose(cli):
    doc = json.loads(cli("anchors", "--classes", 100, "--dim", 64, "--json").stdout)
    assert doc["method"] == "auto (orthoplex)" and doc["min_angle_deg"] == pytest.approx(90.0)


@pytest.mark.slow
def test_optimized_100_in_2d_cli(cli):
    doc = json.loads(cli("anchors", "--classes", 100, "--dim", 2, "--method", "optimized", "--json").stdout)
    assert doc["min_angle_deg"] >= 3.58


def test_json_and_out(cli, tmp_path):
    out = tmp_path / "a.safetensors"
    proc = cli("anchors", "--classes", 100, "--dim", 512, "--method", "orthogonal", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert doc["classes"] == 100 and doc["dim"] == 512
    assert doc["loss_floor"] == pytest.approx(3.2216, abs=1e-3)

    t = load_file(str(out))["anchors"]
    assert t.shape == (100, 512) and t.dtype == torch.float32
    assert torch.equal(t, torch.eye(100, 512))
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["method"] == "orthogonal"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--classes", 11, "--dim", 10, "--method", "orthogonal"], "orthogonal anchors need dim >= classes"),
        (["--classes", 1, "--dim", 3], "classes must be"),
        (["--classes", 3, "--dim", 0], "dim must be"),
        (["--classes", 3, "--dim", 3, "--method", "bogus"], "unknown anchor method"),
        (["--classes", 3, "--dim", 3, "--metric", "manhattan"], "unknown metric"),
        (["--classes", "x", "--dim", 3], "Invalid value for '--classes'"),
        (["--dim", 3], "Missing option"),
        (["--classes", 3, "--dim", 3, "--bogus"], "No such option"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, args, fragment):
    assert_clean_error(cli("anchors", *args), 2, fragment)


def test_debug_shows_traceback(cli):
    proc = cli("--debug", "anchors", "--classes", 11, "--dim", 10, "--method", "orthogonal")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from ncmcli.cli import app\n"
        "for argv in (['--help'], ['anchors', '--help'], ['presets', '--help']):\n"
        "    try:\n"
        "        app(argv, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_a_mistyped_method_gets_a_did_you_mean(cli):
    from conftest import assert_clean_error

    assert_clean_error(
        cli("anchors", "-C", "10", "-d", "9", "--method", "simplx"), 2, "(did you mean 'simplex'?)"
    )


def test_help_shows_no_type_after_plain_flags(cli):
    for cmd in (("train",), ("eval",), ("predict",), ("export",), ("anchors",), ("report",)):
        text = cli(*cmd, "--help").stdout
        flags = [ln for ln in text.splitlines() if "--json" in ln or "--force" in ln or "--quiet" in ln]
        assert all("<bool>" not in ln for ln in flags), (cmd, flags)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--classes", "1000000", "--dim", "2"], "--classes must be in"),
        (["--classes", "10000", "--dim", "65536"], "classes x dim"),
        (["--classes", "10", "--dim", "0"], "--dim must be in"),
    ],
)
def test_anchors_are_bounded(args, fragment):
    assert_clean_error(capped("anchors", *args, timeout=60), 2, fragment)
