import pytest
import torch

from ncmcli import build_net
from ncmcli.config.presets import resolve
from ncmcli.nn.models import ARCHS
from ncmcli.train.schedules import make_optimizer

SHAPES = {"mnist2d": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_net_gives_features_and_every_parameter_a_gradient(arch):
    channels, size = SHAPES.get(arch, (3, 32))
    torch.manual_seed(0)
    net = build_net(arch, in_channels=channels, image_size=size, dropout=0.1)
    x = torch.randn(2, channels, size, size)
    f = net(x)
    assert f.shape == (2, ARCHS[arch].feature_dim)
    f.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_table1_layout():
    net = build_net("cifar100", in_channels=3, image_size=32, dropout=0.25)
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96] * 5 + [192] * 4 + [384] * 4
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.body) == 3
    assert [m.p for m in net.body if isinstance(m, torch.nn.Dropout)] == [0.25, 0.25]
    assert net.fc.in_features == 384 * 4 * 4 and net.fc.out_features == 512
    # The feature layer has no activation: features take negative values.
    assert (net(torch.randn(4, 3, 32, 32)) < 0).any()
    mnist = build_net("mnist", in_channels=1, image_size=28)
    assert mnist.fc.in_features == 64 * 3 * 3 and mnist.fc.out_features == 256


def test_bad_arch_and_dropout():
    with pytest.raises(ValueError, match="choose one of"):
        build_net("resnet", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="dropout"):
        build_net("mnist", in_channels=1, image_size=28, dropout=1.0)


def test_mlp400_is_hsu_et_al_s_two_hidden_layers_of_400_then_the_feature_fc():
    net = build_net("mlp400", in_channels=1, image_size=28, dropout=0.0)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 400), (400, 400), (400, 128)]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    net = net.double()
    by_hand = x.flatten(1)
    for m in linears[:2]:
        by_hand = torch.relu(by_hand @ m.weight.T + m.bias)
    by_hand = by_hand @ linears[2].weight.T + linears[2].bias
    torch.testing.assert_close(net(x), by_hand)
    assert build_net("mlp400", in_channels=1, image_size=28, feature_dim=16).feature_dim == 16


@pytest.mark.parametrize("arch,size", [("resnet18-cifar", 32), ("resnet18", 64)])
def test_resnet_backbones_give_the_feature_dim_and_train_a_step(arch, size):
    from ncmcli.nn.classifier import Classifier

    for loss in ("encm", "softmax"):
        cfg = resolve(
            f"quickstart{'' if loss == 'encm' else '-softmax'}",
            [f"model.arch={arch}", "model.feature_dim=64"],
        )
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
    with pytest.raises(ValueError) as exc:
        build_net("resnet18", in_channels=3, image_size=64, pretrained=True)
    msg = str(exc.value)
    assert "\n" not in msg and "resnet18-" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(ValueError, match="applies to the ResNets"):
        build_net("tiny", in_channels=1, image_size=28, pretrained=True)


def test_bn_relu_head_is_liu_et_als_and_linear_reaches_negative_coordinates():
    from ncmcli.nn.models import build_net

    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    liu = build_net("tiny", in_channels=1, image_size=28, head="linear-bn-relu").train()
    f = liu(x)
    assert isinstance(liu.head[0], torch.nn.BatchNorm1d) and (f >= 0).all() and (f > 0).any()
    plain = build_net("tiny", in_channels=1, image_size=28).train()
    assert plain.head is None and (plain(x) < 0).any()
    with pytest.raises(ValueError, match="model.head"):
        build_net("tiny", in_channels=1, image_size=28, head="relu")
