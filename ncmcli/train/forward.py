"""One forward pass over a split: the single loop that evaluation, diagnostics, plots and
``predict`` all use to run a model over data."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ncmcli.data.batching import batches
from ncmcli.nn.scores import confusion_of
from ncmcli.train.runtime import dist_info


def forward_split(
    classifier, split, *, device, batch_size: int, shard: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(features, logits, labels) per batch of ``split``, in order, without gradients and
    with the classifier (a ``Classifier``) in eval mode (no dropout, no centre updates, no L-Softmax
    schedule steps). ``shard`` keeps this rank's rows ``[rank::world]`` under DDP."""
    rank, world = dist_info()
    if shard and world > 1:
        split = split.shard(rank, world)
    classifier.eval()
    net, criterion = classifier.parts()
    with torch.no_grad():
        for x, y in batches(split, batch_size, mean=classifier.mean, std=classifier.std, device=device):
            feats = net(x)
            yield feats, criterion.logits(feats), y


def evaluate(classifier, split, *, device, batch_size: int, keep_outputs: bool = False) -> dict:
    """Loss, accuracy and the confusion matrix of ``split``, summed on the device. Under DDP
    each rank takes the rows ``[rank::world]`` and the sums are all-reduced: exact counts,
    no padded duplicates. ``keep_outputs`` also returns the features, logits and labels (on
    the CPU) for diagnostics, from the same single pass."""
    world, criterion, num_classes = dist_info()[1], classifier.criterion, len(classifier.classes)
    full_n = len(split)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    kept: list[tuple] = []
    for feats, logits, y in forward_split(
        classifier, split, device=device, batch_size=batch_size, shard=True
    ):
        with torch.no_grad():
            loss_sum += criterion(feats, y).double() * len(
                y
            )  # the training loss (L-Softmax: with its margin)
            pred = criterion.predict(feats)
        confusion += confusion_of(pred, y, num_classes)
        if keep_outputs:
            kept.append((feats.float().cpu(), logits.float().cpu(), y.cpu()))
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(confusion)
    n = full_n
    conf = confusion.cpu()
    correct = int(conf.diag().sum())
    # A class without test images has no accuracy (None, shown as n/a), not 0.
    per_class = [int(hit) / int(total) if total else None for hit, total in zip(conf.diag(), conf.sum(1))]
    out = {
        "loss": loss_sum.item() / n,
        "accuracy": correct / n,
        "error_pct": 100.0 * (1 - correct / n),
        "n": n,
        "per_class_accuracy": per_class,
        "confusion": conf.tolist(),
    }
    if keep_outputs:
        out["features"], out["logits"], out["labels"] = (torch.cat(parts) for parts in zip(*kept))
    return out


@torch.no_grad()
def extract(classifier, split, *, device, batch_size: int = 1024):
    """(features (N, d), logits (N, C), labels (N,)) of a split, on the CPU."""
    parts = [
        (f.float().cpu(), z.float().cpu(), y.cpu())
        for f, z, y in forward_split(classifier, split, device=device, batch_size=batch_size)
    ]
    feats, logits, labels = zip(*parts)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)
