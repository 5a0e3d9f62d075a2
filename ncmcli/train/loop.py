"""Training: one loop, visible top to bottom in ``train``. Its set-up (``setup``), its files
and the resume (``resume``) and what it records (``record``) are helpers beside it that
return plain objects; nothing here is a Trainer or a callback."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

import torch

from ncmcli.config.schema import Config
from ncmcli.data.batching import batches
from ncmcli.errors import NcmError
from ncmcli.runs import runfiles, trainstate
from ncmcli.runs.rundir import RunDir
from ncmcli.runs.tblog import TensorBoard, feature_diagnostics
from ncmcli.train.forward import evaluate
from ncmcli.train.record import announce, epoch_metrics, result_record
from ncmcli.train.reporter import Reporter
from ncmcli.train.resume import Checkpoints, clear_stale_temps, open_parent, open_run
from ncmcli.train.runtime import dist_info
from ncmcli.train.schedules import PlateauOnExcess
from ncmcli.train.setup import Setup, TrainingDiverged, build_run, evaluated, start_epoch, update_ema


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


def _tensorboard(cfg: Config, run_dir: Path, rank: int, first_epoch: int):
    """The TensorBoard log of rank 0 when ``train.tensorboard`` is on, else None."""
    if not cfg.train.tensorboard or rank != 0:
        return None

    return TensorBoard(run_dir, first_epoch=first_epoch)


def _evaluate_epoch(cfg: Config, run: Setup, device, *, keep_outputs: bool) -> tuple[dict, dict | None]:
    """Test (and validation) metrics of the evaluated model (the EMA when on). Under DDP every
    rank first takes rank 0's BatchNorm statistics: the ones its checkpoint will hold."""
    clf = evaluated(run)
    if dist_info()[1] > 1:
        for buf in clf.buffers():
            torch.distributed.broadcast(buf, 0)
    kw = dict(device=device, batch_size=cfg.train.eval_batch_size)
    ev = evaluate(clf, run.test_split, keep_outputs=keep_outputs, **kw)
    if keep_outputs:  # for TensorBoard: compactness and separation of the test features
        ev["feature_diagnostics"] = feature_diagnostics(clf.criterion, ev.pop("features"), ev.pop("labels"))
    val = None if run.val_split is None else evaluate(clf, run.val_split, **kw)
    return ev, val


def _interrupt(stop: StopRequest, run_dir: Path, epoch: int, step: int) -> Interrupted:
    """The one exception both stop paths raise (mid-epoch, and after an epoch)."""
    where = f"at epoch {epoch}, step {step}" if step else f"after epoch {epoch}"
    return Interrupted(
        f"stopped by {stop.signal_name} {where}; resume with: ncm train --resume {run_dir}",
        _signal_exit_code(stop.signal_name),
        run_dir=run_dir,
        epoch=epoch,
        step=step,
    )


def train(
    cfg: Config,
    *,
    run_dir: Path,
    device: torch.device,
    reporter: Reporter,
    preset: str | None = None,
    overrides: list[str] = (),
    resume=False,
    stop: StopRequest | None = None,
    extend: Path | None = None,
) -> dict:
    """Train ``cfg`` into ``run_dir`` and return the result record (also in result.json).

    ``resume`` (True, or that file's ``CheckpointFile`` already read) continues from
    ``run_dir/last.safetensors`` exactly where it stopped. On a ``stop`` request training stops
    at the next step boundary, saves a resumable ``last`` checkpoint and raises ``Interrupted``.
    ``extend``: a checkpoint whose classes this run keeps and adds ``data.classes`` to
    (``ncmcli.runs.incremental``)."""

    t_start, (rank, world) = time.time(), dist_info()
    clear_stale_temps(run_dir)
    # -- Set up (data, classifier, optimiser, schedule), then resume or start the run's files
    parent = open_parent(run_dir, resume, extend)
    run = build_run(cfg, device, reporter.message, parent=parent)
    try:
        open_run(cfg, run, run_dir, device, resume=resume, parent=parent, reporter=reporter)
        announce(cfg, run, run_dir, device, reporter)
        optimizer, scheduler, progress, saved = (
            run.optimizer,
            run.scheduler,
            run.progress,
            Checkpoints(cfg, run, run_dir, device),
        )
        history = RunDir(run_dir).metrics(reporter.message) if resume else []
        tb = _tensorboard(cfg, run_dir, rank, progress.epoch + 1)
        every = cfg.train.log_every_steps  # host reads of the device totals: every this many steps
        for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
            # -- Train one epoch; loss, accuracy and the NaN guard accumulate on the device
            start_epoch(cfg, run, epoch)  # train mode; the backbone frozen for the first epochs, if asked
            epoch_rng = run.gen.get_state()  # a mid-epoch resume replays this epoch's order from here
            reporter.epoch_start(epoch, cfg.train.epochs, run.steps_per_epoch)
            at = EpochCursor(progress, device)
            for i, (x, y) in enumerate(
                batches(
                    run.train_split,
                    cfg.train.batch_size,
                    mean=run.mean,
                    std=run.std,
                    device=device,
                    generator=run.gen,
                    augment_batches=cfg.data.augment,
                    flip_batches=cfg.data.hflip,
                    skip=at.skip,
                    rank=rank,
                    world=world,
                ),
                at.skip + 1,
            ):
                loss, feats = run.step(x, y)
                optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                read = at.add(
                    loss,
                    run.criterion.predict(feats.detach()),
                    y,
                    read=i % every == 0 or i == run.steps_per_epoch,
                )
                # -- NaN guard: read before the step, so bad weights never reach a checkpoint
                if read is not None and read[2] is not None:
                    raise _diverged(cfg, run_dir, epoch, read[2], progress.global_step + 1 - (i - read[2]))
                run.warmup.step(progress.global_step, lambda: run.scaler.step(optimizer))
                run.scaler.update()
                update_ema(run)
                if run.per_step:
                    scheduler.step()
                progress.global_step += 1
                reporter.step(i, *at.shown(read))
                # -- Stop request (a signal): save a resumable checkpoint at this boundary
                if _stop_requested(stop, i, every, world) and i < run.steps_per_epoch:
                    at.pause(i)
                    saved.save(runfiles.LAST, epoch - 1, {"interrupted_at_step": i}, epoch_rng)
                    raise _interrupt(stop, run_dir, epoch, i)
            train_loss, train_acc, epoch_time, seen = at.finish(world)
            # -- Evaluate on the test (and validation) split; the epoch-counted schedules step
            ev, val = _evaluate_epoch(cfg, run, device, keep_outputs=tb is not None)
            lr = optimizer.param_groups[0]["lr"]
            _epoch_schedule(run, train_loss)
            metrics = epoch_metrics(
                run,
                epoch,
                train_loss,
                train_acc,
                ev,
                val,
                lr=lr,
                images_per_s=round(seen / max(epoch_time, 1e-9), 1),
                epoch_time=epoch_time,
            )
            history.append(metrics)
            # -- Checkpoint: best (on validation accuracy, else test; result.json says which), last
            # (resumable), one metrics line
            progress.epoch, progress.step, progress.loss_sum, progress.correct, progress.seen = (
                epoch,
                0,
                0.0,
                0,
                0,
            )
            saved.end_epoch(epoch, metrics)
            reporter.epoch_end(metrics)
            if tb is not None:
                tb.epoch(metrics, ev)
            if _stop_requested(stop, 0, 1, world) and epoch < cfg.train.epochs:
                raise _interrupt(stop, run_dir, epoch, 0)
        if tb is not None:
            tb.close()
        result = result_record(
            cfg, run, run_dir, history, device=device, preset=preset, overrides=overrides, t_start=t_start
        )
        if rank == 0:
            RunDir(run_dir).write_result(result)
        return result
    finally:
        run.close()  # DataLoader workers stop now, not whenever the splits are collected


def _epoch_schedule(run: Setup, train_loss: float) -> None:
    """The schedules counted in epochs: plateau-on-excess reads the train loss (and, with a
    learned scale, the moved loss floor); multistep counts epochs."""
    if isinstance(run.scheduler, PlateauOnExcess):
        if run.criterion.uses_anchors and run.criterion.learn_scale:
            run.scheduler.floor = run.criterion.loss_floor()  # a learned scale moves the floor
        run.scheduler.step(train_loss)
    elif run.scheduler is not None and not run.per_step:
        run.scheduler.step()


def _diverged(cfg: Config, run_dir: Path, epoch: int, step: int, global_step: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"the loss became NaN or infinite at epoch {epoch}, step {step} (global step {global_step}); try a lower "
        f"learning rate than optim.lr={cfg.optim.lr:g}. Checkpoints from earlier epochs in {run_dir} are untouched"
    )


def _signal_exit_code(name: str) -> int:
    """128 + the signal number, the shell's convention (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    import signal

    try:
        return 128 + int(signal.Signals[name])
    except KeyError:
        return 130


def _stop_requested(stop, step: int, every: int, world: int) -> bool:
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
