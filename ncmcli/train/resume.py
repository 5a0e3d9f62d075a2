"""A run's files during training: a new run's config.yaml (with its run id), an --extend run's
parent record and replay memory, the checkpoints written each epoch or on a stop, and the
restore that puts a resumed run back exactly where ``last.safetensors`` stopped."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import torch

from ncmcli.config.overrides import to_yaml
from ncmcli.config.schema import Config
from ncmcli.data import replay
from ncmcli.runs import checkpoint, incremental, runfiles, trainstate
from ncmcli.runs.ckfile import CheckpointFile
from ncmcli.runs.rundir import RunDir
from ncmcli.storage import atomic_write_text, bounded_json, remove_stale_temps
from ncmcli.train.record import scale_comment, selection
from ncmcli.train.runtime import dist_info, gather_rng
from ncmcli.train.setup import Setup, evaluated
from ncmcli.train.step import check_finite


def restore(run: Setup, run_dir: Path, device: torch.device, file=None) -> dict:
    """Put ``run`` back exactly where ``run_dir/last.safetensors`` stopped: weights, anchors,
    optimiser, schedule, the data generator, the RNGs, the position in the epoch (and, with
    EMA, the average and the live weights). ``file``: that file's ``CheckpointFile``, when the
    caller has read it already (it is read once, then released). Returns the metrics line of
    the epoch the file was written at (empty for a mid-epoch stop's file)."""
    checked = isinstance(file, CheckpointFile)  # `ncm train --resume` matched its run id to config.yaml's
    file = file if checked else CheckpointFile.read(run_dir / runfiles.LAST)
    last = checkpoint.load(file, device)
    state = trainstate.unpack(file)
    saved_metrics = bounded_json(file.meta.get("metrics") or "{}")
    file.release()
    if run.ema is not None:
        ema_net, ema_crit = evaluated(run).parts()
        ema_net.load_state_dict(last.model.state_dict())
        ema_crit.load_state_dict(last.criterion.state_dict())
        run.ema.n_averaged = int(state.progress.global_step)
        raw = {k: v.to(device) for k, v in state.raw.items()}
        run.model.load_state_dict({k[6:]: v for k, v in raw.items() if k.startswith("model.")})
        run.criterion.load_state_dict({k[10:]: v for k, v in raw.items() if k.startswith("criterion.")})
    else:
        run.model.load_state_dict(last.model.state_dict())
        run.criterion.load_state_dict(last.criterion.state_dict())
    run.optimizer.load_state_dict(state.optimizer)
    trainstate.restore_scheduler(run.scheduler, state.scheduler)
    run.gen.set_state(state.data_rng)
    torch.set_rng_state(state.torch_rng)
    if device.type == "cuda":  # only this rank's own device, from its own saved state
        mine = trainstate.rng_for_rank(state.cuda_rng, dist_info()[0])
        if mine is not None:
            torch.cuda.set_rng_state(mine, device)
    if state.scaler and run.scaler.is_enabled():
        run.scaler.load_state_dict(state.scaler)  # the fp16 loss scale carries on, not from 65536
    run.progress = state.progress
    run.run_id = file.meta.get("run_id") if checked else RunDir(run_dir).run_id()
    return saved_metrics if isinstance(saved_metrics, dict) else {}


def repair_metrics(run_dir: Path, epoch: int, saved: dict, note) -> None:
    """Make metrics.jsonl agree with last.safetensors after a kill between the epoch's writes
    (checkpoints, then the metrics line; RELIABILITY.md's crash table): a torn last line (no
    newline: killed mid-append) is dropped; lines past ``epoch`` are dropped; a missing line
    for ``epoch`` is rebuilt from the checkpoint's own copy (``saved``), so the next append
    starts on a line of its own and no epoch is lost or counted twice."""
    path = RunDir(run_dir).metrics_file
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline; else a torn line
    if tail:
        note(f"note: dropped the torn last line of {path} (a crash mid-append)")
    rows = runfiles.read_metrics_lines(lines, path, note)
    kept = [r for r in rows if r["epoch"] <= epoch]
    if len(kept) < len(rows):
        note(f"note: dropped {len(rows) - len(kept)} lines of {path} past epoch {epoch}, the checkpoint's")
    if epoch > 0 and (not kept or kept[-1]["epoch"] < epoch) and saved.get("epoch") == epoch:
        kept.append(saved)
        note(f"note: rebuilt epoch {epoch}'s line of {path} from last.safetensors")
    if tail or len(kept) != len(rows) or kept != rows:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def open_parent(run_dir: Path, resume: bool, extend: Path | None):
    """The checkpoint an --extend run starts from: on --resume, the one its folder recorded."""

    if resume:
        return incremental.parent_of_run(run_dir)
    return incremental.open_parent(extend) if extend is not None else None


def open_run(cfg: Config, run: Setup, run_dir: Path, device, *, resume: bool, parent, reporter) -> None:
    """Resume from last.safetensors, or start the run's files: config.yaml (its run id first),
    an --extend run's parent record, and train.replay's memory."""

    rank = dist_info()[0]
    if resume:
        saved = restore(run, run_dir, device, resume)
        if rank == 0 and run.progress.step == 0:  # at an epoch's end: its line must be there
            repair_metrics(run_dir, run.progress.epoch, saved, reporter.message)
        elif rank == 0:  # a mid-epoch stop: lines up to the epoch before it
            repair_metrics(run_dir, run.progress.epoch, {}, reporter.message)
        reporter.message(f"resuming {run_dir} after epoch {run.progress.epoch}, step {run.progress.step}")
    else:
        run.run_id = secrets.token_hex(
            8
        )  # ties the run's checkpoints to its folder (config.yaml's first line)
        if rank == 0:
            RunDir(run_dir).write_config(to_yaml(cfg), run.run_id, scale_comment(cfg, run.criterion))
            if parent is not None:
                incremental.write_parent_record(run_dir, parent)
    if rank == 0 and run.memory is not None and (not resume or not (run_dir / runfiles.REPLAY).is_file()):
        replay.save(run_dir / runfiles.REPLAY, run.memory)  # seeded: a resume would choose the same images
    if parent is not None:
        new = run.lineage.tasks[-1]
        reporter.message(
            f"extending {parent.path} ({len(parent.classes)} classes, {len(parent.tasks)} task"
            f"{'s' if len(parent.tasks) > 1 else ''}) with {len(new)} new: {', '.join(new[:10])}"
            + (", ..." if len(new) > 10 else "")
        )


def clear_stale_temps(run_dir: Path) -> None:
    """Remove the temp files a process killed mid-write (SIGKILL) left; rank 0 only, as only the
    writing rank may touch the folder."""
    if dist_info()[0] == 0:
        remove_stale_temps(run_dir, locked=True)  # the caller holds the folder's lock


class Checkpoints:
    """The checkpoints a run writes (rank 0 only): ``best`` on the selection metric (validation
    accuracy, else test accuracy; ``selection``), ``last`` (resumable) every epoch and on a stop,
    and one metrics line per epoch. Weights are checked before every save, so NaN never reaches
    a checkpoint even when a stop falls between the loop's loss reads."""

    def __init__(self, cfg: Config, run: Setup, run_dir: Path, device: torch.device):
        self.cfg, self.run, self.run_dir, self.device = cfg, run, run_dir, device
        self.select_on = selection(run)[0]
        self.writer = dist_info()[0] == 0

    def save(self, name: str, epoch: int, metrics: dict, epoch_rng: torch.Tensor | None = None) -> None:
        """``name`` for ``epoch``; with ``epoch_rng`` (the data generator's state where the
        epoch to resume starts) it carries the train state and can be resumed."""
        if not self.writer:
            return
        run = self.run
        where = f"epoch {epoch} ({name} not written; earlier checkpoints are untouched)"
        check_finite(run.model, run.criterion, where)
        clf = evaluated(run)  # the EMA when on
        if run.ema is not None:
            check_finite(clf.net, clf.criterion, where)
        extra = None if epoch_rng is None else trainstate.pack(self.snapshot(epoch_rng))
        checkpoint.save(
            self.run_dir / name,
            clf,
            config=self.cfg,
            epoch=epoch,
            metrics=metrics,
            extra=extra,
            run_id=run.run_id,
            class_counts=run.data.train_counts,
            imbalance=run.data.imbalance,
            lineage=run.lineage,
        )

    def snapshot(self, epoch_rng: torch.Tensor) -> trainstate.TrainState:
        run, device = self.run, self.device
        raw = (
            {}
            if run.ema is None
            else {  # with EMA the file's weights are the average: the live ones go here
                **{f"model.{k}": v for k, v in run.model.state_dict().items()},
                **{f"criterion.{k}": v for k, v in run.criterion.state_dict().items()},
            }
        )
        cuda = gather_rng(torch.cuda.get_rng_state(device), device) if device.type == "cuda" else []
        return trainstate.TrainState(
            run.progress,
            run.optimizer.state_dict(),
            run.scheduler.state_dict() if run.scheduler is not None else None,
            epoch_rng,
            torch.get_rng_state(),
            cuda,
            raw,
            run.scaler.state_dict() if run.scaler.is_enabled() else None,
        )

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        """After an epoch (``run.progress`` already at its end): best if it improved, last, and
        the metrics line."""
        progress = self.run.progress
        if progress.best is None or metrics[self.select_on] > progress.best[self.select_on]:
            progress.best = metrics
            self.save(runfiles.BEST, epoch, metrics)
        self.save(runfiles.LAST, epoch, metrics, self.run.gen.get_state())
        if self.writer:
            RunDir(self.run_dir).append_metrics(metrics)
