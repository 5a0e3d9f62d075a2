"""The paper's CNNs (Table 1), built from a short declarative spec.

A spec is a list of stages ``(channels, n_convs)``. Stage 0 is Conv0; a 2x2 max-pool
(stride 2) follows stages 1, 2 and 3, and dropout p follows pools 1 and 2. Each conv is
3x3 with padding 1, then BatchNorm, then ReLU. A final Linear maps the flattened map to
the feature dim d; ``head="linear-bn-relu"`` follows it with BatchNorm and ReLU, as in Liu et
al.'s released L-Softmax models (ip1 -> BN -> ReLU).
"""

from __future__ import annotations

import torch
from torch import nn

from ncmcli.netspecs import ARCH_NAMES, ARCHS, MLPS, RESNETS, MLPSpec, NetSpec, ResNetSpec
from ncmcli.registry import DROPOUT_RANGE, HEADS

_POOL_AFTER = {1, 2, 3}
_DROPOUT_AFTER = {1, 2}


class FeatureNet(nn.Module):
    """Image (B, C_in, H, W) -> feature (B, d). The last layer has no activation, so that
    features can reach anchors with negative coordinates."""

    def __init__(
        self,
        spec: NetSpec,
        *,
        in_channels: int,
        image_size: int,
        dropout: float = 0.0,
        feature_dim: int | None = None,
        head: str = "linear",
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown model.head {head!r}; choose one of: {', '.join(HEADS)}")
        if not DROPOUT_RANGE[0] <= dropout < DROPOUT_RANGE[1]:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        if in_channels < 1 or image_size < 8:
            raise ValueError(f"input must have >= 1 channel and size >= 8, got {in_channels}x{image_size}")
        d = feature_dim or spec.feature_dim
        layers: list[nn.Module] = []
        ch, size = in_channels, image_size
        for i, (out_ch, convs) in enumerate(spec.stages):
            for _ in range(convs):
                layers += [
                    nn.Conv2d(ch, out_ch, 3, padding=1, bias=False),  # BN carries the bias
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                ]
                ch = out_ch
            if i in _POOL_AFTER:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            if i in _DROPOUT_AFTER and dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(ch * size * size, d)
        # Liu et al.'s head; a ReLU head cannot reach anchors with negative coordinates.
        self.head = _head(head, d)
        self.feature_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)  # (B, C_last, H/8, W/8)
        f = self.fc(torch.flatten(x, 1))  # (B, d)
        return f if self.head is None else self.head(f)


class MLPFeatures(nn.Module):
    """Flattened image -> Linear-ReLU hidden layers (dropout p after each) -> the feature FC
    to d, with the same optional head as the conv nets."""

    def __init__(
        self,
        spec: MLPSpec,
        *,
        in_channels: int,
        image_size: int,
        dropout: float = 0.0,
        feature_dim: int | None = None,
        head: str = "linear",
    ):
        super().__init__()
        if head not in HEADS or not DROPOUT_RANGE[0] <= dropout < DROPOUT_RANGE[1]:
            raise ValueError(f"model.dropout must be in [0, 1) and model.head one of {', '.join(HEADS)}")
        width, layers = in_channels * image_size * image_size, [nn.Flatten()]
        for units in spec.hidden:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            width = units
        d = feature_dim or spec.feature_dim
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, d)
        self.head = _head(head, d)
        self.feature_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fc(self.body(x))  # (B, d)
        return f if self.head is None else self.head(f)


class ResNetFeatures(nn.Module):
    """A torchvision ResNet as the feature net: its classifier replaced by a Linear to d (plus
    Liu et al.'s BN-ReLU head if asked), so that every criterion sits on top. The 32x32 variant
    swaps the 7x7 stride-2 stem and the max-pool for a 3x3 stride-1 stem."""

    def __init__(
        self,
        spec: ResNetSpec,
        *,
        in_channels: int,
        dropout: float = 0.0,
        feature_dim: int | None = None,
        head: str = "linear",
        pretrained: bool = False,
    ):
        super().__init__()
        import torchvision

        builder = getattr(torchvision.models, spec.torchvision_name)  # a fixed table entry, never user text
        net = builder(weights=_pretrained_weights(spec) if pretrained else None)
        if spec.small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        d = feature_dim or spec.feature_dim
        width = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(width, d)
        self.head = _head(head, d)
        self.feature_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fc(self.drop(self.body(x)))  # (B, d)
        return f if self.head is None else self.head(f)


def _pretrained_weights(spec: ResNetSpec):
    """torchvision's ImageNet weights, downloaded into $TORCH_HOME/hub/checkpoints when online;
    offline, one line that says where to put the file. (torchvision reads them with
    ``weights_only=True``, a restricted loader that builds tensors only.)"""
    import os
    from pathlib import Path

    import torchvision

    enum = getattr(
        torchvision.models,
        {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights"}[spec.torchvision_name],
    )
    weights = enum.IMAGENET1K_V1
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    name = weights.url.rsplit("/", 1)[-1]
    if not (hub / name).is_file():
        try:
            import torch.hub

            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise ValueError(
                f"model.pretrained: cannot download {weights.url} ({reason}); offline, copy {name} "
                f"into {hub} from a machine with internet, or set model.pretrained=false"
            ) from None
    return weights


def backbone_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter of a feature net but its feature FC (``fc``) and head: what
    ``optim.backbone_lr_factor`` slows and ``model.freeze_backbone_epochs`` freezes."""
    head = {
        id(p)
        for name in ("fc", "head")
        if getattr(net, name, None) is not None
        for p in getattr(net, name).parameters()
    }
    return [p for p in net.parameters() if id(p) not in head]


def build_net(
    arch: str,
    *,
    in_channels: int,
    image_size: int,
    dropout: float = 0.0,
    feature_dim: int | None = None,
    head: str = "linear",
    pretrained: bool = False,
) -> nn.Module:
    if arch in RESNETS:
        if not DROPOUT_RANGE[0] <= dropout < DROPOUT_RANGE[1] or head not in HEADS:
            raise ValueError(f"model.dropout must be in [0, 1) and model.head one of {', '.join(HEADS)}")
        return ResNetFeatures(
            RESNETS[arch],
            in_channels=in_channels,
            dropout=dropout,
            feature_dim=feature_dim,
            head=head,
            pretrained=pretrained,
        )
    if pretrained:
        raise ValueError(f"model.pretrained applies to the ResNets ({', '.join(RESNETS)}), not {arch}")
    if arch in MLPS:
        return MLPFeatures(
            MLPS[arch],
            in_channels=in_channels,
            image_size=image_size,
            dropout=dropout,
            feature_dim=feature_dim,
            head=head,
        )
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of: {', '.join(ARCH_NAMES)}")
    return FeatureNet(
        ARCHS[arch],
        in_channels=in_channels,
        image_size=image_size,
        dropout=dropout,
        feature_dim=feature_dim,
        head=head,
    )


def _head(head: str, d: int) -> nn.Module | None:
    """What follows the feature Linear: nothing (``linear``, the paper's), or Liu et al.'s
    BatchNorm + ReLU (``linear-bn-relu``, their released L-Softmax models' ip1 -> BN -> ReLU)."""
    return nn.Sequential(nn.BatchNorm1d(d), nn.ReLU(inplace=True)) if head == "linear-bn-relu" else None
