"""The training loop: one function, top to bottom, with small named helpers beside it."""

from __future__ import annotations

import bisect
import json
import math
import os
import secrets
import time
from pathlib import Path

import torch
from torch import nn

from ncmcli import checkpoint, runfiles
from ncmcli.config import Config, to_yaml
from ncmcli.errors import NcmError, UsageError


class TrainingDiverged(NcmError):
    """The loss became NaN or Inf."""


def build_from_config(cfg, num_classes: int, input_shape):
    """The feature net, its anchors (None for softmax) and its criterion, from a config."""
    from ncmcli.anchors import make_anchors
    from ncmcli.losses import NCM_METRICS, build_criterion
    from ncmcli.models import build_net

    model = build_net(cfg.model.arch, in_channels=input_shape[0], image_size=input_shape[1],
                      dropout=cfg.model.dropout, feature_dim=cfg.model.feature_dim or None,
                      head=cfg.model.head)
    anchors = None
    if cfg.loss.name in NCM_METRICS:
        anchors = make_anchors(cfg.anchors.method, num_classes, model.feature_dim, seed=cfg.anchors.seed)
    criterion = build_criterion(cfg.loss, anchors=anchors, dim=model.feature_dim, num_classes=num_classes)
    return model, anchors, criterion


def evaluate(model, criterion, split, *, mean, std, device, batch_size: int, num_classes: int,
             keep_outputs: bool = False) -> dict:
    """Loss, accuracy and the confusion matrix of ``split``, summed on the device. Under DDP
    each rank takes the rows ``[rank::world]`` and the sums are all-reduced: exact counts,
    no padded duplicates. ``keep_outputs`` also returns the features, logits and labels (on
    the CPU) for diagnostics, from the same single pass."""
    import torch

    from ncmcli.batching import batches

    rank, world = dist_info()
    full_n = len(split)
    if world > 1:
        split = split.shard(rank, world)
    model.eval()
    criterion.eval()  # no centre updates or L-Softmax schedule steps on evaluation data
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    kept: list[tuple] = []
    with torch.no_grad():
        for x, y in batches(split, batch_size, mean=mean, std=std, device=device):
            feats = model(x)
            loss_sum += criterion(feats, y).double() * len(y)
            pred = criterion.predict(feats)
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
            if keep_outputs:
                kept.append((feats.float().cpu(), criterion.logits(feats).float().cpu(), y.cpu()))
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(confusion)
    n = full_n
    conf = confusion.cpu()
    correct = int(conf.diag().sum())
    # A class without test images has no accuracy (None, shown as n/a), not 0.
    per_class = [int(hit) / int(total) if total else None for hit, total in zip(conf.diag(), conf.sum(1))]
    out = {"loss": loss_sum.item() / n, "accuracy": correct / n, "error_pct": 100.0 * (1 - correct / n),
           "n": n, "per_class_accuracy": per_class, "confusion": conf.tolist()}
    if keep_outputs:
        out["features"], out["logits"], out["labels"] = (torch.cat(parts) for parts in zip(*kept))
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Step(nn.Module):
    """One forward for training: the net under autocast, then the criterion in fp32. A single
    module so that DDP synchronises the criterion's parameters (softmax/hinge heads) too."""

    def __init__(self, net, criterion, amp_dtype, memory_format):
        super().__init__()
        self.net, self.criterion = net, criterion
        self.amp_dtype, self.memory_format = amp_dtype, memory_format

    def forward(self, x, y):
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            feats = self.net(x.contiguous(memory_format=self.memory_format))
        return self.criterion(feats, y), feats  # outside autocast: distances and the loss stay fp32


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(cfg: Config, model, criterion) -> torch.optim.Optimizer:
    params = list(model.parameters()) + list(criterion.parameters())
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


class PlateauOnExcess:
    """The paper's "divide it by 10 when the training loss plateaus", fair to every loss.

    Progress is measured on the *excess* of the epoch's training loss over the criterion's
    floor (0 for softmax-type heads; 1.159 nats for E-NCM with 10 orthonormal anchors). A 1%
    drop of a raw NCM loss near its floor would be a 12-14% drop of what is left, so NCM runs
    would be cut far earlier than SoftMax runs under a rule on the raw loss.

    An epoch improves when ``excess < best * (1 - threshold)``. After more than ``patience``
    epochs without improvement the lr is multiplied by ``factor``, at most ``max_drops``
    times and never below ``min_lr``. Its state is plain numbers (resumable, pickle-free)."""

    def __init__(self, optimizer, *, floor: float = 0.0, factor: float = 0.1, patience: int = 5,
                 threshold: float = 0.01, max_drops: int = 3, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.floor, self.factor, self.patience = float(floor), factor, patience
        self.threshold, self.max_drops, self.min_lr = threshold, max_drops, min_lr
        self.best = math.inf
        self.bad_epochs = 0
        self.drops = 0

    def step(self, train_loss: float) -> bool:
        """Record one epoch's mean training loss; True when the lr was cut."""
        excess = max(train_loss - self.floor, 0.0)
        if excess < self.best * (1.0 - self.threshold):
            self.best, self.bad_epochs = excess, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs <= self.patience or self.drops >= self.max_drops:
            return False
        cut = False
        for group in self.optimizer.param_groups:
            new = max(group["lr"] * self.factor, self.min_lr)
            cut |= new < group["lr"]
            group["lr"] = new
        self.bad_epochs = 0
        self.drops += int(cut)
        return cut

    def state_dict(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best, "bad_epochs": self.bad_epochs,
                "drops": self.drops, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_epochs = int(state.get("bad_epochs", state.get("num_bad_epochs", 0)))
        self.drops = int(state.get("drops", 0))


def multistep_factor(step: int, milestones, factor: float) -> float:
    """The lr multiplier after ``step`` steps (or epochs): ``factor`` per milestone passed."""
    return factor ** bisect.bisect_right(list(milestones), step)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int, *, floor: float = 0.0):
    """(scheduler, per_step). Plateau steps once per epoch on the training loss's excess over
    ``floor``; multistep cuts at its milestones, counted in epochs or in steps (iterations)."""
    o = cfg.optim
    if o.schedule == "plateau":
        return PlateauOnExcess(optimizer, floor=floor, factor=o.lr_factor, patience=o.patience,
                               threshold=o.threshold, max_drops=o.max_drops, min_lr=o.min_lr), False
    if o.schedule == "multistep":
        per_step = o.milestone_unit == "step"
        milestones, factor = tuple(o.milestones), o.lr_factor
        # A per-step LambdaLR sees its own step count; a per-epoch one is stepped after each epoch.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: multistep_factor(s, milestones, factor)), per_step
    if o.schedule == "cosine":
        total = max(1, cfg.train.epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))), True
    return None, False


def prepare_run_dir(out: Path | None, runs_root: Path, name: str, force: bool) -> tuple[Path, bool]:
    """A fresh run folder, checked writable before any training starts. Unique even for
    runs started in the same second: a random suffix, created with exist_ok=False."""
    if out is not None:
        run_dir = Path(out)
        created = not run_dir.exists()
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--out {run_dir} exists and is not a folder")
        if run_dir.is_dir():
            from ncmcli import runfiles

            holds_run = runfiles.holds_run(run_dir)
            if holds_run and not force:
                raise UsageError(f"{run_dir} already holds a run; use another --out, or --force to overwrite it")
            if not holds_run and any(runfiles.foreign_entries(run_dir)):
                raise UsageError(f"--out {run_dir} is a non-empty folder that is not a run folder; "
                                 "give a new or empty folder")
            if holds_run:
                runfiles.clear_run(run_dir)  # --force: no old metrics lines or checkpoints mix in
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {run_dir} ({exc.strerror})") from None
    else:
        created = True
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).lstrip(".") or "run"
        for _ in range(100):
            run_dir = Path(runs_root) / f"{safe}-{stamp}-{secrets.token_hex(3)}"
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise UsageError(f"cannot create run folder under {runs_root} ({exc.strerror})") from None
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder {run_dir} is not writable ({exc.strerror})") from None
    return run_dir, created


def check_finite(model: nn.Module, criterion: nn.Module, where: str) -> None:
    """Raise TrainingDiverged if any floating-point weight or buffer is NaN or infinite."""
    flags = [torch.isfinite(t).all() for m in (model, criterion) for t in m.state_dict().values()
             if t.is_floating_point()]
    if flags and not bool(torch.stack(flags).all()):
        raise TrainingDiverged(f"the weights became NaN or infinite at {where}; try a lower optim.lr")


class Interrupted(NcmError):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int, *, run_dir: Path | None = None, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.exit_code = exit_code
        self.run_dir, self.epoch, self.step = run_dir, epoch, step

    def to_dict(self) -> dict:
        """What a ``--json`` pipeline gets instead of a result: never empty input."""
        return {"status": "interrupted", "run_dir": str(self.run_dir), "epoch": self.epoch, "step": self.step,
                "resume": f"ncm train --resume {self.run_dir}", "exit_code": self.exit_code, "message": str(self)}


def train(cfg: Config, *, run_dir: Path, device: torch.device, reporter, preset: str | None = None,
          overrides: list[str] = (), resume: bool = False, stop=None) -> dict:
    """Train ``cfg`` into ``run_dir`` and return the result record (also in result.json).

    ``resume`` continues from ``run_dir/last.safetensors`` exactly where it stopped.
    ``stop`` is an object with ``is_set()`` and ``signal_name`` (the CLI sets it on
    SIGINT/SIGTERM): training then stops at the next step boundary, saves a resumable
    ``last`` checkpoint and raises ``Interrupted``."""
    from ncmcli import trainstate
    from ncmcli.anchors import anchor_certificate
    from ncmcli.batching import batches, split_stats
    from ncmcli.data import load_dataset

    t_start = time.time()
    if dist_info()[0] == 0:  # only the writing rank may touch the folder
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write (SIGKILL)
            stale.unlink(missing_ok=True)
    # -- Setup: seeds, threads, data, model, anchors, criterion, optimiser
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    data = load_dataset(cfg.data)
    num_classes, input_shape = len(data.classes), data.input_shape
    mean, std = split_stats(data.train, normalization=cfg.data.normalization)  # the paper's: global
    model, anchors, criterion = build_from_config(cfg, num_classes, input_shape)
    model.to(device)
    criterion.to(device)
    # -- Speed settings; none changes the maths beyond the autocast rounding
    amp_dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None  # fp16 only
    channels_last = cfg.train.channels_last == "true" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True
    # The compiled and DDP wrappers only run the steps; checkpoints save the plain modules.
    step = _Step(torch.compile(model) if cfg.train.compile else model, criterion, amp_dtype, memory_format)
    rank, world = dist_info()
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    train_split, test_split = data.train.to(device), data.test.to(device)
    val_split = data.val.to(device) if data.val is not None else None
    select_on = "val_acc" if val_split is not None else "test_acc"
    steps_per_epoch = math.ceil(len(train_split) / cfg.train.batch_size)
    optimizer = make_optimizer(cfg, model, criterion)
    scheduler, per_step = make_scheduler(cfg, optimizer, steps_per_epoch, floor=criterion.loss_floor())
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation draws
    progress = trainstate.Progress()
    run_id = secrets.token_hex(8)  # ties the run's checkpoints to its folder (config.yaml's first line)
    if resume:
        last = checkpoint.load(run_dir / "last.safetensors", device)
        model.load_state_dict(last.model.state_dict())
        criterion.load_state_dict(last.criterion.state_dict())
        anchors = getattr(criterion, "anchors", None)
        state = trainstate.unpack(run_dir / "last.safetensors")
        optimizer.load_state_dict(state.optimizer)
        trainstate.restore_scheduler(scheduler, state.scheduler)
        gen.set_state(state.data_rng)
        torch.set_rng_state(state.torch_rng)
        if device.type == "cuda" and state.cuda_rng:
            torch.cuda.set_rng_state_all(state.cuda_rng)
        progress = state.progress
        reporter.message(f"resuming {run_dir} after epoch {progress.epoch}, step {progress.step}")
        run_id = checkpoint.run_id_of_config((run_dir / "config.yaml").read_text(encoding="utf-8", errors="replace"))
    elif rank == 0:
        checkpoint.atomic_write_text(run_dir / "config.yaml", checkpoint.RUN_ID_PREFIX + run_id + "\n" + to_yaml(cfg))
    if anchors is not None:
        reporter.certificate(anchor_certificate(anchors, cfg.anchors.method, criterion.metric, cfg.loss.scale).to_dict())
    reporter.message(f"run folder: {run_dir}")
    for note in data.notes:
        reporter.message(note)
    reporter.message(f"data: {data.name}, {len(train_split)} train"
                     + (f" / {len(val_split)} validation" if val_split is not None else "")
                     + f" / {len(test_split)} test, "
                     f"{num_classes} classes, input {input_shape}; device: {device}"
                     + (f"; DDP over {world} processes, {cfg.train.batch_size // world} images each per step" if world > 1 else ""))

    def save(path: Path, epoch: int, metrics: dict, state: trainstate.TrainState | None = None) -> None:
        if rank != 0:  # only rank 0 writes files
            return
        # On CUDA the loss is checked every 25 steps only, and a stop can fall between checks:
        # weights are checked before every save, so NaN never reaches a checkpoint.
        check_finite(model, criterion, f"epoch {epoch} ({path.name} not written; earlier checkpoints are untouched)")
        extra = trainstate.pack(state) if state is not None else None
        checkpoint.save(path, model=model, criterion=criterion, config=cfg, classes=data.classes,
                        mean=mean, std=std, input_shape=input_shape, epoch=epoch, metrics=metrics, extra=extra,
                        run_id=run_id)

    def snapshot(epoch_rng: torch.Tensor) -> trainstate.TrainState:
        return trainstate.TrainState(
            progress, optimizer.state_dict(), scheduler.state_dict() if scheduler is not None else None,
            epoch_rng, torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if device.type == "cuda" else [])

    history = runfiles.read_metrics(run_dir / runfiles.METRICS, reporter.message) if resume else []
    sync_every = 1 if device.type == "cpu" else 25
    for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
        # -- Train one epoch; loss and accuracy accumulate on the device (no per-step sync)
        model.train()
        criterion.train()
        epoch_rng = gen.get_state()  # a mid-epoch resume replays this epoch's order from here
        reporter.epoch_start(epoch, cfg.train.epochs, steps_per_epoch)
        skip = progress.step
        loss_sum = torch.tensor(progress.loss_sum, device=device, dtype=torch.float64)
        correct = torch.tensor(progress.correct, device=device, dtype=torch.int64)
        seen, seen0, t0 = progress.seen, progress.seen, time.time()
        for i, (x, y) in enumerate(batches(train_split, cfg.train.batch_size, mean=mean, std=std,
                                            device=device, generator=gen, augment_batches=cfg.data.augment,
                                            flip_batches=cfg.data.hflip,
                                            skip=skip, rank=rank, world=world), skip + 1):
            loss, feats = step(x, y)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            # -- NaN guard: checked before the step, so bad weights never reach a checkpoint
            if (i % sync_every == 0 or i == steps_per_epoch) and not math.isfinite(loss.item()):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch}, step {i} (global step {progress.global_step + 1}); "
                    f"try a lower learning rate than optim.lr={cfg.optim.lr:g}. "
                    f"Checkpoints from earlier epochs in {run_dir} are untouched")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if per_step:
                scheduler.step()
            progress.global_step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (criterion.predict(feats.detach()) == y).sum()
            seen += len(y)
            if i % sync_every == 0 or i == steps_per_epoch:
                reporter.step(i, loss_sum.item() / seen, correct.item() / seen,
                              (seen - seen0) / max(time.time() - t0, 1e-9))
            # -- Stop request (Ctrl-C, SIGTERM): save a resumable checkpoint at this boundary
            if _stop_requested(stop, i, sync_every, world) and i < steps_per_epoch:
                progress.step, progress.loss_sum, progress.correct = i, loss_sum.item(), int(correct.item())
                progress.seen = seen
                progress.train_time += time.time() - t0
                save(run_dir / "last.safetensors", epoch - 1, {"interrupted_at_step": i}, snapshot(epoch_rng))
                raise Interrupted(
                    f"stopped by {stop.signal_name} at epoch {epoch}, step {i}; resume with: "
                    f"ncm train --resume {run_dir}", _signal_exit_code(stop.signal_name),
                    run_dir=run_dir, epoch=epoch, step=i)
        epoch_time = time.time() - t0
        if world > 1:  # epoch totals over all ranks
            totals = torch.tensor([loss_sum.item(), float(correct.item()), float(seen)], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1].long(), int(totals[2].item())
        progress.train_time += epoch_time
        progress.train_images += seen - seen0
        train_loss = loss_sum.item() / seen
        # -- Evaluate on the test split (under DDP, rank 0's BatchNorm statistics everywhere:
        # the ones its checkpoint will hold)
        if world > 1:
            for buf in [*model.buffers(), *criterion.buffers()]:
                torch.distributed.broadcast(buf, 0)
        ev = evaluate(model, criterion, test_split, mean=mean, std=std, device=device,
                      batch_size=cfg.train.eval_batch_size, num_classes=num_classes)
        val = None if val_split is None else evaluate(
            model, criterion, val_split, mean=mean, std=std, device=device,
            batch_size=cfg.train.eval_batch_size, num_classes=num_classes)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, PlateauOnExcess):
            scheduler.step(train_loss)
        elif scheduler is not None and not per_step:
            scheduler.step()  # multistep counted in epochs
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
                   "test_loss": ev["loss"], "test_acc": ev["accuracy"], "test_error_pct": ev["error_pct"],
                   "lr": lr, "epoch_time_s": round(epoch_time, 3), "images_per_s": round(seen / max(epoch_time, 1e-9), 1)}
        if val is not None:
            metrics.update(val_loss=val["loss"], val_acc=val["accuracy"], val_error_pct=val["error_pct"])
        history.append(metrics)
        # -- Checkpoint: best on validation accuracy when there is a validation split, else on
        # test accuracy (said in result.json); last (resumable) every epoch; one metrics line
        progress.epoch, progress.step, progress.loss_sum, progress.correct, progress.seen = epoch, 0, 0.0, 0, 0
        if progress.best is None or metrics[select_on] > progress.best[select_on]:
            progress.best = metrics
            save(run_dir / "best.safetensors", epoch, metrics)
        save(run_dir / "last.safetensors", epoch, metrics, snapshot(gen.get_state()))
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(metrics) + "\n")
        reporter.epoch_end(metrics)
        if _stop_requested(stop, 0, 1, world) and epoch < cfg.train.epochs:
            raise Interrupted(f"stopped by {stop.signal_name} after epoch {epoch}; resume with: "
                              f"ncm train --resume {run_dir}", _signal_exit_code(stop.signal_name),
                              run_dir=run_dir, epoch=epoch, step=0)

    final, best = history[-1], progress.best
    result = {
        "status": "completed", "run_dir": str(run_dir), "preset": preset, "overrides": list(overrides),
        "dataset": data.name, "arch": cfg.model.arch, "loss": cfg.loss.name, "seed": cfg.seed,
        "epochs": cfg.train.epochs, "device": str(device),
        "final": {k: final[k] for k in ("epoch", "train_loss", "test_loss", "test_acc", "test_error_pct")},
        "best": {k: best[k] for k in ("epoch", "test_acc", "test_error_pct", "val_acc", "val_error_pct") if k in best},
        "best_selected_on": "validation" if val_split is not None else "test",
        "test_acc": final["test_acc"], "test_error_pct": final["test_error_pct"],
        "checkpoint": str(run_dir / "best.safetensors"), "last_checkpoint": str(run_dir / "last.safetensors"),
        "train_images_per_s": round(progress.train_images / max(progress.train_time, 1e-9), 1),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    if anchors is not None:
        from ncmcli.anchors import loss_floor

        result["loss_floor"] = loss_floor(anchors, criterion.metric, cfg.loss.scale)
    if world > 1:
        result["ddp"] = {"world_size": world, "params_identical_across_ranks": _same_on_all_ranks(model, criterion)}
    if rank == 0:
        checkpoint.atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


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


def _same_on_all_ranks(model, criterion) -> bool:
    """A consistency check after DDP training: every rank holds the same weights."""
    tensors = [*model.parameters(), *criterion.parameters(), *model.buffers(), *criterion.buffers()]
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    lo, hi = flat.clone(), flat.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
