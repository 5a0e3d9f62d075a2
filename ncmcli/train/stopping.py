"""Stopping on a signal: the request the CLI sets (``StopRequest``), the agreement between
DDP ranks on when to stop, and the ``Interrupted`` error raised after the resumable save."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Protocol

import torch

from ncmcli.errors import NcmError


class StopRequest(Protocol):
    """A request to stop at the next step boundary (the CLI sets it on a signal)."""

    signal_name: str

    def is_set(self) -> bool: ...


class Interrupted(NcmError):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(
        self, message: str, exit_code: int, *, run_dir: Path | None = None, epoch: int = 0, step: int = 0
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.run_dir, self.epoch, self.step = run_dir, epoch, step

    def to_dict(self) -> dict:
        """What a ``--json`` pipeline gets instead of a result: never empty input."""
        return {
            "status": "interrupted",
            "run_dir": str(self.run_dir),
            "epoch": self.epoch,
            "step": self.step,
            "resume": f"ncm train --resume {self.run_dir}",
            "exit_code": self.exit_code,
            "message": str(self),
        }


def interrupt(stop: StopRequest, run_dir: Path, epoch: int, step: int) -> Interrupted:
    """The one exception both stop paths raise (mid-epoch, and after an epoch)."""
    where = f"at epoch {epoch}, step {step}" if step else f"after epoch {epoch}"
    return Interrupted(
        f"stopped by {stop.signal_name} {where}; resume with: ncm train --resume {run_dir}",
        _signal_exit_code(stop.signal_name),
        run_dir=run_dir,
        epoch=epoch,
        step=step,
    )


def _signal_exit_code(name: str) -> int:
    """128 + the signal number, the shell's convention (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    try:
        return 128 + int(signal.Signals[name])
    except KeyError:
        return 130


def stop_requested(stop, step: int, every: int, world: int) -> bool:
    """Whether to stop now. Under DDP the ranks agree (all-reduce every ``every`` steps),
    so that they all stop at the same step."""
    local = stop is not None and stop.is_set()
    if world == 1:
        return local
    if step % every:
        return False
    flag = torch.tensor([1.0 if local else 0.0])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
