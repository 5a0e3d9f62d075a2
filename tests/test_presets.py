"""Every registered preset: resolves, prints, builds its net, and takes training steps."""

import subprocess
import sys
import zipfile

import pytest
import torch
import yaml

from ncmcli.config.overrides import to_yaml
from ncmcli.config.presets import list_presets, resolve
from ncmcli.train.schedules import make_optimizer
from ncmcli.nn.classifier import Classifier

SHAPES = {"mnist": (1, 28), "fashion-mnist": (1, 28), "quickstart": (1, 28), "cifar10": (3, 32),
          "cifar100": (3, 32), "folder": (3, 32)}
PRESETS = sorted(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_trains_a_few_steps(name):
    cfg = resolve(name)
    assert yaml.safe_load(to_yaml(cfg))["loss"]["name"] == cfg.loss.name
    classes = 100 if cfg.data.name == "cifar100" else 10
    ch, size = SHAPES[cfg.data.name]
    torch.manual_seed(0)
    model, crit = Classifier.from_config(cfg, classes, (ch, size, size)).parts()
    opt = make_optimizer(cfg, model, crit)
    x, y = torch.randn(4, ch, size, size), torch.arange(4) % classes
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_print_config_for_every_preset(ncm):
    for name in ("quickstart", "cifar100-encm", "mnist2d-softmax"):
        proc = ncm("train", "--preset", name, "--print-config", "--set", "model.dropout=0.25")
        assert proc.returncode == 0, proc.stderr
        tree = yaml.safe_load(proc.stdout)
        assert tree["model"]["dropout"] == 0.25 and resolve(name).to_dict()["data"] == tree["data"]


def test_presets_command_lists_descriptions(ncm):
    proc = ncm("presets")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS) and all(len(line.split(None, 1)) == 2 for line in lines)


@pytest.mark.slow
def test_wheel_carries_presets_and_quickstart_data(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(repo)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("ncmcli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ncmcli/presets/quickstart.yaml" in names and "ncmcli/presets/cifar100-encm.yaml" in names
    assert "ncmcli/quickstart/fashion-mnist-quickstart.safetensors.gz" in names
    assert sum(n.startswith("ncmcli/presets/") for n in names) == len(list((repo / "presets").glob("*.yaml")))
    assert "ncmcli/presets/_paper.yaml" in names  # the hidden bases travel too
