"""Training: one loop, visible top to bottom in ``train``. Its set-up (``setup``), its files
and the resume (``resume``) and what it records (``record``) are helpers beside it that
return plain objects; nothing here is a Trainer or a callback."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ncmcli.config.schema import Config
from ncmcli.runs import runfiles
from ncmcli.runs.rundir import RunDir
from ncmcli.runs.tblog import TensorBoard, feature_diagnostics
from ncmcli.train.cursor import EpochCursor
from ncmcli.train.forward import evaluate
from ncmcli.train.record import announce, epoch_metrics, result_record
from ncmcli.train.reporter import Reporter
from ncmcli.train.resume import Checkpoints, clear_stale_temps, open_parent, open_run
from ncmcli.train.runtime import dist_info
from ncmcli.train.schedules import PlateauOnExcess
from ncmcli.train.setup import Setup, build_run, evaluated, start_epoch, update_ema
from ncmcli.train.step import TrainingDiverged
from ncmcli.train.stopping import StopRequest, interrupt, stop_requested


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
        progress, saved = run.progress, Checkpoints(cfg, run, run_dir, device)
        history = RunDir(run_dir).metrics(reporter.message) if resume else []
        tb = _tensorboard(cfg, run_dir, rank, progress.epoch + 1)
        every = cfg.train.log_every_steps  # host reads of the device totals: every this many steps
        for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
            # -- Train one epoch; loss, accuracy and the NaN guard accumulate on the device
            start_epoch(cfg, run, epoch)  # train mode; the backbone frozen for the first epochs, if asked
            epoch_rng = run.gen.get_state()  # a mid-epoch resume replays this epoch's order from here
            reporter.epoch_start(epoch, cfg.train.epochs, run.steps_per_epoch)
            at = EpochCursor(progress, device)
            for i, (x, y) in enumerate(run.loader.epoch(skip=at.skip), at.skip + 1):
                loss, feats = run.step(x, y)
                run.optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                last = i == run.steps_per_epoch
                read = at.add(loss, run.criterion.predict(feats.detach()), y, read=i % every == 0 or last)
                # -- NaN guard: read before the step, so bad weights never reach a checkpoint
                if read is not None and read[2] is not None:
                    raise _diverged(cfg, run_dir, epoch, read[2], progress.global_step + 1 - (i - read[2]))
                run.warmup.step(progress.global_step, lambda: run.scaler.step(run.optimizer))
                run.scaler.update()
                update_ema(run)
                if run.per_step:
                    run.scheduler.step()
                progress.global_step += 1
                reporter.step(i, *at.shown(read))
                # -- Stop request (a signal): save a resumable checkpoint at this boundary
                if stop_requested(stop, i, every, world) and not last:
                    at.pause(i)
                    saved.save(runfiles.LAST, epoch - 1, {"interrupted_at_step": i}, epoch_rng)
                    raise interrupt(stop, run_dir, epoch, i)
            trained = at.finish(world)  # (loss, accuracy, seconds, images), over every rank
            # -- Evaluate on the test (and validation) split; the epoch-counted schedules step
            ev, val = _evaluate_epoch(cfg, run, device, keep_outputs=tb is not None)
            metrics = epoch_metrics(run, epoch, trained, ev, val)  # the lr before the schedule steps
            _epoch_schedule(run, metrics["train_loss"])
            history.append(metrics)
            # -- Checkpoint: best (on validation accuracy, else test; result.json says which),
            # last (resumable), one metrics line
            progress.end_epoch(epoch)
            saved.end_epoch(epoch, metrics)
            reporter.epoch_end(metrics)
            if tb is not None:
                tb.epoch(metrics, ev)
            if stop_requested(stop, 0, 1, world) and epoch < cfg.train.epochs:
                raise interrupt(stop, run_dir, epoch, 0)
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
