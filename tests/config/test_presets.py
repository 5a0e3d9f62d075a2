"""Every registered preset: resolves, prints, builds its net, and takes training steps."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_clean_error, capped

from ncmcli.config import overrides as O
from ncmcli.config import presets as P
from ncmcli.config.overrides import to_yaml
from ncmcli.config.presets import list_presets, resolve
from ncmcli.nn.baselines import LSoftmaxLoss
from ncmcli.nn.classifier import Classifier
from ncmcli.train.schedules import make_optimizer

SHAPES = {
    "mnist": (1, 28),
    "fashion-mnist": (1, 28),
    "quickstart": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
    "folder": (3, 32),
}
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


def test_print_config_for_every_preset(cli):
    for name in ("quickstart", "cifar100-encm", "mnist2d-softmax"):
        proc = cli("train", "--preset", name, "--print-config", "--set", "model.dropout=0.25")
        assert proc.returncode == 0, proc.stderr
        tree = yaml.safe_load(proc.stdout)
        assert tree["model"]["dropout"] == 0.25 and resolve(name).to_dict()["data"] == tree["data"]


def test_presets_command_lists_descriptions(cli):
    proc = cli("presets")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS) and all(len(line.split(None, 1)) == 2 for line in lines)


@pytest.mark.slow
def test_wheel_carries_presets_and_quickstart_data(tmp_path):

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(repo)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("ncmcli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ncmcli/presets/quickstart.yaml" in names and "ncmcli/presets/cifar100-encm.yaml" in names
    assert "ncmcli/quickstart/fashion-mnist-quickstart.safetensors.gz" in names
    assert sum(n.startswith("ncmcli/presets/") for n in names) == len(list((repo / "presets").glob("*.yaml")))
    assert "ncmcli/presets/_paper.yaml" in names  # the hidden bases travel too


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    + ["description: *i"]
)


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
    assert_clean_error(
        capped("train", "--preset", deep_map, "--print-config", timeout=30), 2, "nested deeper"
    )
    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * 200_000 + "'\n")
    assert_clean_error(capped("train", "--preset", big, "--print-config", timeout=30), 2, "at most 64 KiB")


def test_relative_base_resolves_against_the_presets_own_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.yaml").write_text("train:\n  epochs: 7\n")
    (tmp_path / "sub" / "mine.yaml").write_text("base: [quickstart, ./common.yaml]\nloss:\n  name: cncm\n")
    monkeypatch.chdir(tmp_path)  # not the preset's folder
    cfg = resolve(str(tmp_path / "sub" / "mine.yaml"))
    assert cfg.train.epochs == 7 and cfg.loss.name == "cncm" and cfg.data.name == "quickstart"


# Liu et al.'s released solvers (wy1iu/LargeMargin_Softmax_Loss, myexamples/*).
LIU = {
    "mnist-lsoftmax4": (2.5e-5, 35.0),
    "cifar10-lsoftmax2": (2e-5, 45.0),
    "cifar10plus-lsoftmax2": (1e-5, 45.0),
}


@pytest.mark.parametrize("preset", sorted(LIU))
def test_lsoftmax_lambda_follows_the_released_annealing(preset):
    gamma, power = LIU[preset]
    cfg = P.resolve(preset)
    assert (cfg.loss.lambda_base, cfg.loss.lambda_gamma, cfg.loss.lambda_power, cfg.loss.lambda_min) == (
        1000,
        gamma,
        power,
        0,
    )
    loss = LSoftmaxLoss(
        8,
        10,
        cfg.loss.margin,
        base=cfg.loss.lambda_base,
        gamma=cfg.loss.lambda_gamma,
        power=cfg.loss.lambda_power,
        lambda_min=cfg.loss.lambda_min,
    )
    for it in (0, 5000, 30000):
        loss.iteration.fill_(it)
        assert loss.current_lambda() == pytest.approx(
            max(0.0, 1000.0 * (1.0 + gamma * it) ** (-power)), rel=1e-12
        )
    loss.iteration.fill_(0)
    assert loss.current_lambda() == 1000.0


def test_liu_presets_follow_the_released_solver():
    for ds, milestones in (
        ("mnist", (5000, 7500)),
        ("cifar10", (5000, 7500)),
        ("cifar10plus", (8000, 12000)),
        ("cifar100", (5000, 7500)),
    ):
        for method in ("hinge", "lsoftmax2", "lsoftmax3", "lsoftmax4"):
            cfg = P.resolve(f"{ds}-{method}")
            assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
                128,
                0.1,
                0.9,
                5e-4,
            )
            assert (cfg.optim.schedule, cfg.optim.milestone_unit, cfg.optim.milestones) == (
                "multistep",
                "step",
                milestones,
            )
            assert cfg.model.dropout == 0 and cfg.model.head == "linear-bn-relu"
            steps = -(-(60000 if ds == "mnist" else 50000) // 128)
            assert 30000 <= cfg.train.epochs * steps < 30000 + steps  # 30,000 iterations
            assert cfg.data.hflip == (ds in ("cifar10", "cifar100")) and cfg.data.augment == (
                ds == "cifar10plus"
            )
            assert "Liu" in cfg.description


def test_paper_presets_follow_section_4_2():
    for ds in ("mnist", "cifar10", "cifar10plus", "cifar100"):
        for m in ("softmax", "cncm", "encm"):
            cfg = P.resolve(f"{ds}-{m}")
            assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.schedule) == (
                256,
                90,
                0.1,
                "plateau",
            )
            assert (
                cfg.model.dropout == 0.1 and cfg.model.head == "linear" and cfg.data.normalization == "global"
            )
    for m in ("softmax", "cncm", "encm", "center"):
        cfg = P.resolve(f"mnist2d-{m}")
        assert cfg.model.dropout == 0.0 and cfg.model.arch == "mnist2d"  # dropout only after Figure 2


def test_changing_one_data_set_base_leaves_the_others_unchanged(tmp_path, monkeypatch):
    before = {name: O.to_yaml(P.resolve(name)) for name in P.list_presets()}
    from ncmcli.config import presets

    copy = tmp_path / "presets"
    shutil.copytree(P.presets_dir(), copy)
    monkeypatch.setattr(presets, "presets_dir", lambda: copy)
    presets._read_yaml_cached.cache_clear()
    (copy / "_cifar100.yaml").write_text(
        (copy / "_cifar100.yaml").read_text() + "train:\n  eval_batch_size: 7\n"
    )
    after = {name: O.to_yaml(P.resolve(name)) for name in P.list_presets()}
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed and all(n.startswith("cifar100-") for n in changed)
    assert len(changed) == len([n for n in before if n.startswith("cifar100-")])
    assert not any(n.startswith("_") for n in before)  # bases are hidden
