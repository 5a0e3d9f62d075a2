import json
import subprocess
import sys

import pytest
import torch

from conftest import assert_clean_error
from conftest import capped
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.mark.parametrize(
    "args,angle",
    [(["--classes", 10, "--dim", 2, "--method", "polar"], "36.00°"),
     (["--classes", 10, "--dim", 9, "--method", "simplex"], "96.38°"),
     (["--classes", 100, "--dim", 64, "--method", "auto"], "90.00°")],
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
    [(["--classes", 11, "--dim", 10, "--method", "orthogonal"], "orthogonal anchors need dim >= classes"),
     (["--classes", 1, "--dim", 3], "classes must be"),
     (["--classes", 3, "--dim", 0], "dim must be"),
     (["--classes", 3, "--dim", 3, "--method", "bogus"], "unknown anchor method"),
     (["--classes", 3, "--dim", 3, "--metric", "manhattan"], "unknown metric"),
     (["--classes", "x", "--dim", 3], "Invalid value for '--classes'"),
     (["--dim", 3], "Missing option"),
     (["--classes", 3, "--dim", 3, "--bogus"], "No such option")],
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

    assert_clean_error(cli("anchors", "-C", "10", "-d", "9", "--method", "simplx"), 2, "(did you mean 'simplex'?)")


def test_help_shows_no_type_after_plain_flags(cli):
    for cmd in (("train",), ("eval",), ("predict",), ("export",), ("anchors",), ("report",)):
        text = cli(*cmd, "--help").stdout
        flags = [ln for ln in text.splitlines() if "--json" in ln or "--force" in ln or "--quiet" in ln]
        assert all("<bool>" not in ln for ln in flags), (cmd, flags)


@pytest.mark.parametrize("args,fragment", [
    (["--classes", "1000000", "--dim", "2"], "--classes must be in"),
    (["--classes", "10000", "--dim", "65536"], "classes x dim"),
    (["--classes", "10", "--dim", "0"], "--dim must be in"),
])
def test_anchors_are_bounded(args, fragment):
    assert_clean_error(capped("anchors", *args, timeout=60), 2, fragment)
