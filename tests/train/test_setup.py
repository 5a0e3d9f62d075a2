"""ncmcli/train/setup.py for fine-tuning what the user has: a backbone lr factor, frozen
backbone epochs, and ImageNet statistics with pretrained weights (the RandomResizedCrop is in
test_augment.py)."""

import pytest
import torch

from ncmcli.config.presets import resolve
from ncmcli.errors import ConfigError


def test_backbone_lr_factor_and_frozen_epochs(tmp_path):
    from safetensors.torch import load_file

    from ncmcli.nn.classifier import Classifier
    from ncmcli.nn.models import backbone_parameters
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter
    from ncmcli.train.schedules import make_optimizer

    cfg = resolve("quickstart-softmax", ["optim.backbone_lr_factor=0.1"])
    model, crit = Classifier.from_config(cfg, 10, (1, 28, 28)).parts()
    opt = make_optimizer(cfg, model, crit)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    back = backbone_parameters(model)
    assert back and all(lr_of[id(p)] == pytest.approx(0.1 * cfg.optim.lr) for p in back)
    assert all(lr_of[id(p)] == cfg.optim.lr for p in [*model.fc.parameters(), *crit.parameters()])
    assert (
        len(make_optimizer(resolve("quickstart", []), model, crit).param_groups) == 1
    )  # factor 1: one group

    from conftest import StopAfter

    from ncmcli.train.stopping import Interrupted

    c = resolve(
        "quickstart-softmax",
        [
            "data.limit_train=128",
            "data.limit_test=32",
            "train.batch_size=64",
            "train.num_threads=1",
            "train.epochs=2",
            "model.freeze_backbone_epochs=1",
        ],
    )
    torch.manual_seed(c.seed)  # what train() builds first: the same initial weights
    init, _ = Classifier.from_config(c, 10, (1, 28, 28)).parts()
    start = {k: v.clone() for k, v in init.state_dict().items()}
    frozen = {n for n, p in init.named_parameters() if any(p is q for q in backbone_parameters(init))}
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(Interrupted):  # stop after epoch 1 (2 steps + the after-epoch check)
        train(c, run_dir=out, device=torch.device("cpu"), reporter=Reporter(), stop=StopAfter(3))
    after_one = load_file(str(out / "last.safetensors"))
    assert frozen and all(torch.equal(after_one[f"model.{n}"], start[n]) for n in frozen)
    assert not torch.equal(after_one["model.fc.weight"], start["fc.weight"])  # the feature FC trained
    train(c, run_dir=out, device=torch.device("cpu"), reporter=Reporter(), resume=True)
    after_two = load_file(str(out / "last.safetensors"))
    assert any(not torch.equal(after_two[f"model.{n}"], start[n]) for n in frozen)  # epoch 2 trains it all
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        resolve("quickstart", ["model.freeze_backbone_epochs=8"])


def test_pretrained_models_normalise_with_imagenet_statistics():
    from ncmcli.train.setup import imagenet_stats

    assert imagenet_stats(3) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    mean, std = imagenet_stats(1)
    assert mean == [pytest.approx(0.449)] and std == [pytest.approx(0.226)]
