"""A split as training batches, one epoch per call: the loop iterates over ``loader.epoch()``
instead of repeating a dozen keywords (airbench's ``CifarLoader`` does the same)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ncmcli.data.batching import batches


@dataclass
class Loader:
    """Normalised (x, y) batches of ``split`` on ``device``: shuffled and augmented with
    ``generator`` (one fresh order per epoch), and under DDP this rank's share of each global
    batch. ``augment``: the ``data.augment`` setting; ``hflip``: flips alone."""

    split: object
    batch_size: int
    mean: list[float]
    std: list[float]
    device: torch.device
    generator: torch.Generator
    augment: bool | str = False
    hflip: bool = False
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        """Steps per epoch."""
        return math.ceil(len(self.split) / self.batch_size)

    def epoch(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches; ``skip`` passes over the first ones (drawing their random
        numbers all the same), so a run resumed mid-epoch sees exactly what it would have."""
        return batches(
            self.split,
            self.batch_size,
            mean=self.mean,
            std=self.std,
            device=self.device,
            generator=self.generator,
            augment_batches=self.augment,
            flip_batches=self.hflip,
            skip=skip,
            rank=self.rank,
            world=self.world,
        )
