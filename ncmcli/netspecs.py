"""The nets as data: Table 1 of Hao et al. and CPU-sized nets of the same shape.

A spec is a list of stages ``(channels, n_convs)``; ``ncmcli.nn.models`` builds it. This module
imports no torch, so the config can check ``model.arch`` names at CLI start-up. To add a net,
add one line to ``ARCHS``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetSpec:
    stages: tuple[tuple[int, int], ...]  # (channels, convs) for Conv0..Conv3
    feature_dim: int
    summary: str


# Table 1 of Hao et al., plus CPU-sized nets of the same shape with fewer channels.
ARCHS: dict[str, NetSpec] = {
    "mnist2d": NetSpec(((64, 1), (64, 3), (64, 3), (64, 3)), 2, "paper MNIST net, 2-D features"),
    "mnist": NetSpec(((64, 1), (64, 3), (64, 3), (64, 3)), 256, "paper MNIST net"),
    "cifar10": NetSpec(((64, 1), (64, 4), (96, 4), (128, 4)), 256, "paper CIFAR-10 net"),
    "cifar100": NetSpec(((96, 1), (96, 4), (192, 4), (384, 4)), 512, "paper CIFAR-100 net"),
    # Table 1's CIFAR-10 layout (13 convs, FC 256) at a quarter of the width: a full CIFAR-10
    # epoch in under 90 s on 2 CPU cores (BENCHMARKS.md).
    "cifar10-cpu": NetSpec(((16, 1), (16, 4), (24, 4), (32, 4)), 256, "paper CIFAR-10 layout, quarter width"),
    "small": NetSpec(((32, 1), (32, 1), (64, 1), (64, 1)), 64, "CPU-sized net, same shape"),
    "small2d": NetSpec(((32, 1), (32, 2), (64, 2), (64, 2)), 2, "CPU-sized net, 2-D features"),
    "tiny": NetSpec(((16, 1), (16, 1), (32, 1), (32, 1)), 32, "quickstart net"),
}


@dataclass(frozen=True)
class ResNetSpec:
    torchvision_name: str  # torchvision.models.<name>
    small_input: bool  # 32x32 inputs: a 3x3 stride-1 stem and no max-pool (the CIFAR variant)
    feature_dim: int
    summary: str


# torchvision backbones for your own data (not Table 1): every loss sits on top of them.
RESNETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("resnet18", False, 512, "torchvision ResNet-18, for larger images"),
    "resnet34": ResNetSpec("resnet34", False, 512, "torchvision ResNet-34, for larger images"),
    "resnet18-cifar": ResNetSpec("resnet18", True, 512, "ResNet-18 for 32x32: 3x3 stem, no max-pool"),
    "resnet34-cifar": ResNetSpec("resnet34", True, 512, "ResNet-34 for 32x32: 3x3 stem, no max-pool"),
}


@dataclass(frozen=True)
class MLPSpec:
    hidden: tuple[int, ...]  # widths of the ReLU hidden layers, then the feature FC
    feature_dim: int
    summary: str


# Fully connected nets for the continual-learning protocols: Hsu et al.'s Split MNIST MLP
# (two hidden layers of 400 units; their head is replaced by the feature FC to d).
MLPS: dict[str, MLPSpec] = {
    "mlp400": MLPSpec((400, 400), 128, "Hsu et al.'s Split MNIST MLP: 2 x 400 ReLU, FC to d"),
}
ARCH_NAMES = (*ARCHS, *MLPS, *RESNETS)
