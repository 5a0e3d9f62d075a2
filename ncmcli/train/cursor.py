"""Where a running epoch stands: the loss and accuracy totals kept on the training device
(``DeviceTotals``) and the cursor over them (``EpochCursor``) that the loop adds each step to,
pauses at a stop and closes at the epoch's end."""

from __future__ import annotations

import os
import time

import torch

from ncmcli.runs import trainstate


class DeviceTotals:
    """An epoch's running loss sum, correct count and first non-finite step, kept on the
    training device: the step adds to them without a host sync; the loop reads them every
    ``train.log_every_steps`` steps."""

    def __init__(self, progress: trainstate.Progress, device: torch.device):
        # One host-to-device copy each, per epoch: a mid-epoch resume carries its totals on.
        self.loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64).to(device)
        self.correct = torch.tensor(progress.correct, dtype=torch.int64).to(device)
        self.step = torch.full((), progress.step, dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        # NCM_SYNC_DEBUG=warn|error: CUDA's sync debug mode between the reads, so that any host
        # sync inside a step warns (benchmarks/device-check.sh counts the warnings).
        mode = os.environ.get("NCM_SYNC_DEBUG", "")
        self.debug = mode if device.type == "cuda" and mode in ("warn", "error") else None
        self._debug(True)

    def _debug(self, on: bool) -> None:
        if self.debug:
            torch.cuda.set_sync_debug_mode(self.debug if on else 0)

    def add(self, loss: torch.Tensor, predicted: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach()
        self.step += 1
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, self.step)
        self.loss_sum += loss.double() * len(y)
        self.correct += (predicted == y).sum()

    def read(self) -> tuple[float, int, int | None]:
        """(loss sum, correct, the epoch's first step whose loss was NaN or infinite or None),
        in one host read."""
        self._debug(False)
        loss_sum, correct, bad = torch.stack(
            [self.loss_sum, self.correct.double(), self.first_bad.double()]
        ).tolist()
        self._debug(True)
        return loss_sum, int(correct), int(bad) if bad >= 0 else None

    def close(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's loss sum and correct count, with the sync debug mode off again."""
        self._debug(False)
        return self.loss_sum, self.correct


class EpochCursor:
    """Where the running epoch stands: the device totals, the images seen (a mid-epoch resume
    starts from the saved count, and skips the batches already trained) and the clock. The
    step adds to it; a stop pauses it into ``progress``; the epoch's end closes it."""

    def __init__(self, progress: trainstate.Progress, device: torch.device):
        self.progress, self.device = progress, device
        self.totals = DeviceTotals(progress, device)
        self.skip, self.seen, self.seen0, self.t0 = progress.step, progress.seen, progress.seen, time.time()

    def add(self, loss, predicted, y, *, read: bool) -> tuple[float, int, int | None] | None:
        """Count one step; with ``read``, the totals in one host read (the loop's one sync)."""
        self.totals.add(loss, predicted, y)
        self.seen += len(y)
        return self.totals.read() if read else None

    def shown(self, read) -> tuple[float | None, float | None, float]:
        """(loss, accuracy) as last read, and the images per second so far."""
        rate = (self.seen - self.seen0) / max(time.time() - self.t0, 1e-9)
        return (read[0] / self.seen, read[1] / self.seen, rate) if read else (None, None, rate)

    def pause(self, step: int) -> None:
        """Into ``progress`` for a resumable checkpoint after ``step``."""
        p = self.progress
        p.step, p.loss_sum, p.correct = step, self.totals.loss_sum.item(), int(self.totals.correct.item())
        p.seen = self.seen
        p.train_time += time.time() - self.t0

    def finish(self, world: int) -> tuple[float, float, float, int]:
        """(train loss, train accuracy, epoch seconds, images), over every DDP rank."""
        loss_sum, correct = self.totals.close()
        epoch_time, seen = time.time() - self.t0, self.seen
        if world > 1:  # epoch totals over all ranks
            totals = torch.tensor(
                [loss_sum.item(), float(correct.item()), float(seen)], device=self.device, dtype=torch.float64
            )
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1].long(), int(totals[2].item())
        self.progress.train_time += epoch_time
        self.progress.train_images += seen - self.seen0
        return loss_sum.item() / seen, correct.item() / seen, epoch_time, seen
