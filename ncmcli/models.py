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

from ncmcli.errors import ConfigError
from ncmcli.netspecs import ARCHS, NetSpec
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
            raise ConfigError(f"unknown model.head {head!r}; choose one of: {', '.join(HEADS)}")
        if not DROPOUT_RANGE[0] <= dropout < DROPOUT_RANGE[1]:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        if in_channels < 1 or image_size < 8:
            raise ConfigError(f"input must have >= 1 channel and size >= 8, got {in_channels}x{image_size}")
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
        self.head = nn.Sequential(nn.BatchNorm1d(d), nn.ReLU(inplace=True)) if head == "linear-bn-relu" else None
        self.feature_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)  # (B, C_last, H/8, W/8)
        f = self.fc(torch.flatten(x, 1))  # (B, d)
        return f if self.head is None else self.head(f)


def build_net(
    arch: str,
    *,
    in_channels: int,
    image_size: int,
    dropout: float = 0.0,
    feature_dim: int | None = None,
    head: str = "linear",
) -> FeatureNet:
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return FeatureNet(
        ARCHS[arch],
        in_channels=in_channels,
        image_size=image_size,
        dropout=dropout,
        feature_dim=feature_dim,
        head=head,
    )
