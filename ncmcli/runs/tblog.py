"""TensorBoard scalars (optional: ``pip install 'ncmcli[tensorboard]'``), through
``torch.utils.tensorboard``. metrics.jsonl stays the source of truth; this is a view of it."""

from __future__ import annotations

from pathlib import Path

import torch

from ncmcli.errors import ConfigError
from ncmcli.nn.metrics import own_and_nearest_other
from ncmcli.runs.runfiles import TENSORBOARD


class TensorBoard:
    """Per-epoch scalars into ``RUN_DIR/tensorboard``: loss, accuracy, lr, images/s, and for
    anchor models the compactness (mean distance to the own anchor) and separation (mean
    distance to the nearest other anchor) of the test features."""

    def __init__(self, run_dir: Path, first_epoch: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard needs TensorBoard: pip install 'ncmcli[tensorboard]'"
            ) from None
        # purge_step drops events a crashed run wrote past its last checkpoint.
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD), purge_step=first_epoch)

    def epoch(self, metrics: dict, ev: dict | None = None) -> None:
        """One epoch's metrics (a metrics.jsonl line) and, from ``ev``, the feature diagnostics."""
        diagnostics = (ev or {}).get("feature_diagnostics", {})
        e = metrics["epoch"]
        for key in (
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "val_loss",
            "val_acc",
            "lr",
            "images_per_s",
        ):
            if key in metrics:
                group = (
                    "train"
                    if key.startswith("train")
                    else "test"
                    if key.startswith("test")
                    else ("val" if key.startswith("val") else "optim")
                )
                self.writer.add_scalar(f"{group}/{key}", metrics[key], e)
        for key, value in (diagnostics or {}).items():
            self.writer.add_scalar(f"features/{key}", value, e)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def feature_diagnostics(criterion, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Compactness and separation of anchor-model features (empty for other criteria)."""
    if not criterion.uses_anchors or len(labels) == 0:
        return {}
    with torch.no_grad():
        dist = criterion.distances(features.to(criterion.anchors.device)).cpu().double()  # (N, C)
    own, nearest_other = own_and_nearest_other(dist, labels)
    return {
        "compactness_mean_own_distance": own.mean().item(),
        "separation_mean_nearest_other": nearest_other.mean().item(),
    }
