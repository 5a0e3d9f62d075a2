"""Training: one loop, visible top to bottom in ``train``, with the set-up, the resume and
the result record as small helpers beside it.

This module is long because the loop is kept whole and visible in one function (STYLE.md),
with the helpers it alone uses beside it rather than spread over modules."""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ncmcli.config.schema import Config, to_yaml
from ncmcli.errors import ConfigError as NcmConfigError, NcmError
from ncmcli.forward import evaluate
from ncmcli.nn.classifier import Classifier
from ncmcli.runs import checkpoint, runfiles, trainstate
from ncmcli.runs.rundir import RunDir
from ncmcli.runtime import dist_info, gather_rng, rank0_first
from ncmcli.train.schedules import PlateauOnExcess, Warmup, make_optimizer, make_scheduler


class TrainingDiverged(NcmError):
    """The loss became NaN or Inf."""


class ProgressReporter(Protocol):
    """What training tells the outside world (the CLI draws it; ``engine.Reporter`` is silent)."""

    def message(self, text: str) -> None: ...
    def certificate(self, cert: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, loss: float | None, acc: float | None, images_per_s: float) -> None: ...
    def epoch_end(self, metrics: dict) -> None: ...


class StopRequest(Protocol):
    """A request to stop at the next step boundary (the CLI sets it on a signal)."""

    signal_name: str

    def is_set(self) -> bool: ...


class TrainStep(nn.Module):
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
        loss_sum, correct, bad = torch.stack([self.loss_sum, self.correct.double(), self.first_bad.double()]).tolist()
        self._debug(True)
        return loss_sum, int(correct), int(bad) if bad >= 0 else None

    def close(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's loss sum and correct count, with the sync debug mode off again."""
        self._debug(False)
        return self.loss_sum, self.correct


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


@dataclass
class Setup:
    """Everything ``train`` needs, built from the config: data, model, criterion, the
    training step, optimiser and schedule, and the data-order generator."""

    data: object
    classifier: Classifier  # the live model: net, criterion, classes, input format
    step: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    per_step: bool
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    train_split: object
    test_split: object
    val_split: object | None
    steps_per_epoch: int
    warmup: Warmup
    ema: nn.Module | None = None  # EMA of the classifier when train.ema_decay > 0
    progress: trainstate.Progress = field(default_factory=trainstate.Progress)
    run_id: str | None = None
    lineage: object = None  # incremental.Lineage: the tasks so far and an --extend run's parent
    memory: object = None  # replay.Memory this run keeps for later --extend runs (train.replay > 0)

    @property
    def model(self) -> nn.Module:
        return self.classifier.net

    @property
    def criterion(self) -> nn.Module:
        return self.classifier.criterion

    @property
    def mean(self) -> list[float]:
        return self.classifier.mean

    @property
    def std(self) -> list[float]:
        return self.classifier.std


def build_run(cfg: Config, device: torch.device, say=None, parent=None) -> Setup:
    """Seeds, threads, data, model, anchors, criterion, the speed settings, optimiser, schedule.
    ``parent``: the ``incremental.Parent`` an --extend run starts from."""
    from ncmcli.data.batching import split_stats
    from ncmcli.data.datasets import load_dataset
    from ncmcli.runs.incremental import check_compatible

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        deterministic_setup(cfg, device.type, os.environ)
        torch.use_deterministic_algorithms(True)
    if parent is not None:
        check_compatible(cfg, parent)
    known = parent.classes if parent is not None else None
    data = rank0_first(lambda: load_dataset(cfg.data, say=say, known_classes=known))  # one download, not one per rank
    if parent is not None:  # the parent's input format: its normalisation, not this task's
        mean, std = list(parent.checkpoint.mean), list(parent.checkpoint.std)
    elif cfg.model.pretrained:  # the statistics the pretrained weights were trained with
        mean, std = imagenet_stats(data.input_shape[0])
    else:
        mean, std = split_stats(data.train, normalization=cfg.data.normalization)  # the paper's: global
    lineage, memory = _lineage(cfg, data, parent)
    if parent is not None:
        from ncmcli.runs.incremental import extended_classifier

        classifier = extended_classifier(cfg, parent, data.classes, data.train_counts)
    else:
        try:
            classifier = Classifier.from_config(cfg, data.classes, data.input_shape, mean=mean, std=std,
                                                class_counts=data.train_counts)
        except NcmError:
            raise
        except (ValueError, TypeError) as exc:  # a library constructor's error is a config error here
            raise NcmConfigError(str(exc)) from None
    model, criterion = classifier.parts()
    _check_size(model, criterion, len(data.classes))
    classifier.to(device)
    # Speed settings; none changes the maths beyond the autocast rounding.
    amp_dtype = resolve_precision(cfg.train.precision, device)
    channels_last = cfg.train.channels_last == "true" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True
    # The compiled and DDP wrappers only run the steps; checkpoints save the plain modules.
    step = TrainStep(torch.compile(model) if cfg.train.compile else model, criterion, amp_dtype, memory_format)
    if dist_info()[1] > 1:
        if cfg.model.freeze_backbone_epochs:  # DDP expects a gradient for every parameter it wraps
            raise NcmConfigError("model.freeze_backbone_epochs is not supported under torchrun (DDP); train the "
                                 "frozen epochs in one process, then --resume under torchrun")
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    train_split = data.train.to(device)
    steps_per_epoch = math.ceil(len(train_split) / cfg.train.batch_size)
    optimizer = make_optimizer(cfg, model, criterion)
    scheduler, per_step = make_scheduler(cfg, optimizer, steps_per_epoch, floor=criterion.loss_floor())
    ema = None
    if cfg.train.ema_decay > 0:
        # Both halves: a SoftMax model's classifier lives in its criterion.
        ema = EMA(classifier, cfg.train.ema_decay)
    return Setup(
        ema=ema, lineage=lineage, memory=memory,
        data=data, classifier=classifier, step=step, optimizer=optimizer, scheduler=scheduler,
        per_step=per_step, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        gen=torch.Generator().manual_seed(cfg.seed),  # data order and augmentation draws
        train_split=train_split, test_split=data.test.to(device),
        val_split=data.val.to(device) if data.val is not None else None, steps_per_epoch=steps_per_epoch,
        warmup=Warmup(optimizer, round(cfg.optim.warmup_epochs * steps_per_epoch)))


def _lineage(cfg: Config, data, parent):
    """The run's task history, with the parent's replay memory mixed into ``data.train`` (an
    --extend run with train.replay), and the memory this run keeps (train.replay > 0)."""
    from ncmcli.data import replay
    from ncmcli.data.batching import Split
    from ncmcli.runs.incremental import Lineage, check_input, mixed_memory

    if cfg.train.replay and not isinstance(data.train, Split):
        raise NcmConfigError("train.replay needs the training split in memory (data.loader=tensor)")
    tasks = [list(data.classes)]
    from_parent = torch.zeros(len(data.train), dtype=torch.bool)
    mixed = None
    if parent is not None:
        check_input(parent, data.input_shape)
        tasks = [*parent.tasks, data.classes[len(parent.classes):]]
        mixed = mixed_memory(cfg, parent, data.classes)
        if mixed is not None:  # rehearsal: the memory joins every epoch's shuffled batches
            data.train = Split(torch.cat([data.train.images, mixed.images]), torch.cat([data.train.labels, mixed.labels]))
            from_parent = torch.cat([from_parent, torch.ones(len(mixed.labels), dtype=torch.bool)])
            data.notes.append(f"replay: {len(mixed.labels)} images of {len(parent.classes)} earlier classes from "
                              f"the parent's memory, mixed into every epoch")
    lineage = Lineage(tasks, None if parent is None else {"path": str(parent.path), "sha256": parent.sha256})
    memory = None
    if cfg.train.replay:
        memory = replay.select(data.train, data.classes, cfg.train.replay, seed=cfg.seed, from_parent=from_parent)
        lineage.replay = {"mixed_in": None if mixed is None else mixed.selection, "kept": memory.selection}
    return lineage, memory


def _check_size(model: nn.Module, criterion: nn.Module, num_classes: int) -> None:
    """Refuse, before training, a model that checkpoint loading would refuse afterwards."""
    from ncmcli.config.schema import MAX_CLASSES, MAX_PARAMS

    n = sum(t.numel() for m in (model, criterion) for t in m.state_dict().values())
    if n > MAX_PARAMS:
        raise NcmConfigError(f"the model has {n:,} parameters and buffers, above the {MAX_PARAMS:,} a checkpoint may "
                             "hold; lower model.feature_dim or data.image_size")
    if num_classes > MAX_CLASSES:
        raise NcmConfigError(f"{num_classes:,} classes is above the {MAX_CLASSES:,} a checkpoint may hold")


def deterministic_setup(cfg: Config, device_type: str, env) -> None:
    """What ``train.deterministic`` needs on CUDA: cuBLAS's fixed workspace (its GEMMs are
    otherwise nondeterministic, and torch raises at the first Linear), set in ``env`` before
    any CUDA work; and no op without a deterministic CUDA kernel, refused up front by name."""
    if device_type != "cuda":
        return
    if cfg.model.arch.startswith("resnet"):
        raise NcmConfigError("train.deterministic on CUDA cannot train model.arch=" + cfg.model.arch
                             + ": adaptive_avg_pool2d's backward has no deterministic CUDA kernel")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's weights


def imagenet_stats(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std (their means for a grayscale input)."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]


def start_epoch(cfg: Config, run: Setup, epoch: int) -> None:
    """Train mode for the epoch; with ``model.freeze_backbone_epochs`` the backbone takes no
    gradients (so no updates, no weight decay) until that many epochs have passed."""
    from ncmcli.nn.models import backbone_parameters

    run.model.train()
    run.criterion.train()
    if cfg.model.freeze_backbone_epochs:
        for p in backbone_parameters(run.model):
            p.requires_grad_(epoch > cfg.model.freeze_backbone_epochs)


def update_ema(run: Setup) -> None:
    """One EMA step after an optimiser step: parameters averaged; buffers (BatchNorm
    statistics, centres, counters) copied from the live model, as they are not weights."""
    if run.ema is None:
        return
    run.ema.update(run.classifier)


class EMA(nn.Module):
    """An exponential moving average of a module's parameters, as torch.optim.swa_utils'
    AveragedModel with get_ema_multi_avg_fn computes it (the first update copies, each later
    one is one ``torch._foreach_lerp_`` by 1 - decay), with buffers copied from the live
    module. Its counter is a Python int, so an update costs no host sync (AveragedModel
    tests its tensor counter against 0 on every update)."""

    def __init__(self, live: nn.Module, decay: float):
        super().__init__()
        import copy

        self.module = copy.deepcopy(live)
        self.decay = float(decay)
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        mine = [p.detach() for p in self.module.parameters()]
        theirs = [p.detach() for p in live.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(live.buffers()))
        self.n_averaged += 1


def evaluated(run: Setup) -> Classifier:
    """The classifier that is evaluated and checkpointed: the EMA when on."""
    return run.classifier if run.ema is None else run.ema.module


def restore(run: Setup, run_dir: Path, device: torch.device, file=None) -> None:
    """Put ``run`` back exactly where ``run_dir/last.safetensors`` stopped: weights, anchors,
    optimiser, schedule, the data generator, the RNGs, the position in the epoch (and, with
    EMA, the average and the live weights). ``file``: that file's ``CheckpointFile``, when the
    caller has read it already (it is read once, then released)."""
    file = file if isinstance(file, checkpoint.CheckpointFile) else checkpoint.CheckpointFile.read(run_dir / runfiles.LAST)
    last = checkpoint.load(file, device)
    state = trainstate.unpack(file)
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
    run.run_id = RunDir(run_dir).run_id()


def _parent(run_dir: Path, resume: bool, extend: Path | None):
    """The checkpoint an --extend run starts from: on --resume, the one its folder recorded."""
    from ncmcli.runs import incremental

    if resume:
        return incremental.parent_of_run(run_dir)
    return incremental.open_parent(extend) if extend is not None else None


def _open_run(cfg: Config, run: Setup, run_dir: Path, device, *, resume: bool, parent, reporter) -> None:
    """Resume from last.safetensors, or start the run's files: config.yaml (its run id first),
    an --extend run's parent record, and train.replay's memory."""
    from ncmcli.runs import incremental
    from ncmcli.data import replay

    rank = dist_info()[0]
    if resume:
        restore(run, run_dir, device, resume)
        reporter.message(f"resuming {run_dir} after epoch {run.progress.epoch}, step {run.progress.step}")
    else:
        run.run_id = secrets.token_hex(8)  # ties the run's checkpoints to its folder (config.yaml's first line)
        if rank == 0:
            RunDir(run_dir).write_config(to_yaml(cfg), run.run_id, scale_comment(cfg, run.criterion))
            if parent is not None:
                incremental.write_parent_record(run_dir, parent)
    if rank == 0 and run.memory is not None and (not resume or not (run_dir / runfiles.REPLAY).is_file()):
        replay.save(run_dir / runfiles.REPLAY, run.memory)  # seeded: a resume would choose the same images
    if parent is not None:
        new = run.lineage.tasks[-1]
        reporter.message(f"extending {parent.path} ({len(parent.classes)} classes, {len(parent.tasks)} task"
                         f"{'s' if len(parent.tasks) > 1 else ''}) with {len(new)} new: {', '.join(new[:10])}"
                         + (", ..." if len(new) > 10 else ""))


def result_record(cfg: Config, run: Setup, run_dir: Path, history: list[dict], *, device, preset, overrides,
                  t_start: float) -> dict:
    """What result.json (and ``--json``) holds."""
    final, best, world = history[-1], run.progress.best, dist_info()[1]
    result = {
        "status": "completed", "run_dir": str(run_dir), "preset": preset, "overrides": list(overrides),
        "dataset": run.data.name, "arch": cfg.model.arch, "loss": cfg.loss.name, "seed": cfg.seed,
        "epochs": cfg.train.epochs, "device": str(device),
        "final": {k: final[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_error_pct",
                                        "test_balanced_acc", "test_head_acc", "test_medium_acc", "test_tail_acc", "scale")
                  if k in final},
        "best": {k: best[k] for k in ("epoch", "test_acc", "test_error_pct", "val_acc", "val_error_pct") if k in best},
        "best_selected_on": {"val_acc": "validation", "test_acc": "test", "epoch": "last epoch"}[selection(run)[0]],
        "test_acc": final["test_acc"], "test_error_pct": final["test_error_pct"],
        "checkpoint": str(run_dir / runfiles.BEST), "last_checkpoint": str(run_dir / runfiles.LAST),
        "train_images_per_s": round(run.progress.train_images / max(run.progress.train_time, 1e-9), 1),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    result["class_counts"] = dict(zip(run.data.classes, run.data.train_counts))
    if len(run.lineage.tasks) > 1 or run.lineage.parent or run.lineage.replay:
        result["tasks"] = final.get("test_tasks") or [{"task": i, "classes": t} for i, t in enumerate(run.lineage.tasks, 1)]
        result["parent"] = run.lineage.parent
        result["replay"] = dict(run.lineage.replay, file=str(run_dir / runfiles.REPLAY)) if run.memory is not None else None
    result["resolved"] = resolved_settings(cfg, run)
    if run.data.imbalance:
        result["imbalance"] = run.data.imbalance
    crit = evaluated(run).criterion
    if crit.uses_anchors:
        result["loss_floor"] = crit.loss_floor()  # at the final scale
        result["scale"] = scale_record(cfg, crit)
    if world > 1:
        result["ddp"] = {"world_size": world,
                         "params_identical_across_ranks": _same_on_all_ranks(run.model, run.criterion)}
    return result


def resolved_settings(cfg: Config, run: Setup) -> dict:
    """What the keys left to ncm became (a folder's image side and channels, an auto scale):
    reports and plot legends show these instead of 0 or auto."""
    c, h, _ = run.data.input_shape
    out = {}
    if cfg.data.name == "folder":
        out.update({"data.image_size": h, "data.channels": c})
    crit = run.criterion
    if crit.uses_anchors and cfg.loss.scale == "auto":
        out["loss.scale"] = f"auto={crit.initial_scale:.4g}"
    return out


def scale_record(cfg: Config, crit) -> dict:
    """What result.json says of an NCM loss's scale: the setting, the number it resolved to at
    the start, the final one (moved only by learn) and the floor at it."""
    from ncmcli.nn.floors import top_probability

    value = crit.scale_value()
    floor = crit.loss_floor()  # at the current scale; with free slots, every slot in the denominator
    rec = {"setting": cfg.loss.scale, "initial": crit.initial_scale, "value": value, "floor": floor,
           "top_probability": top_probability(floor)}
    if isinstance(cfg.loss.scale, str):
        rec["floor_target"] = cfg.loss.floor_target
    return rec


def scale_comment(cfg: Config, crit) -> str:
    """config.yaml's note of what auto/learn resolved to (a comment: the config keeps the
    user's setting, and a checkpoint rebuilds from the anchors or its stored scale)."""
    if not crit.uses_anchors or not isinstance(cfg.loss.scale, str):
        return ""
    return (f"# loss.scale={cfg.loss.scale} resolved to {crit.scale_value():.6g} at the start "
            f"(loss floor {cfg.loss.floor_target:g} nats)\n")


MIN_SELECT_VAL, WARN_VAL = 50, 200  # validation images: below these best is not chosen / may be noise


def selection(run: Setup) -> tuple[str, str]:
    """(the metric best.safetensors is chosen on, a warning or ""). On a validation split of
    fewer than 50 images one image moves the accuracy by more than 2 points, so best follows
    the last epoch instead; under 200 it is chosen, with a warning."""
    if run.val_split is None:
        return "test_acc", ""
    n = len(run.val_split)
    point = 100.0 / n
    if n < MIN_SELECT_VAL:
        return "epoch", (f"warning: the validation split has only {n} images (one is {point:.1f} points of accuracy): "
                         f"too few to choose on, so best.safetensors follows the last epoch (raise data.val_split)")
    if n < WARN_VAL:
        return "val_acc", (f"warning: the validation split has only {n} images (one is {point:.1f} points of accuracy): "
                           "best.safetensors may be chosen by noise; compare with --which last")
    return "val_acc", ""


def _announce(cfg: Config, run: Setup, run_dir: Path, device, reporter: ProgressReporter) -> None:
    from ncmcli.nn.anchors import anchor_certificate

    crit, data, world = run.criterion, run.data, dist_info()[1]
    if crit.uses_anchors:
        reporter.certificate(anchor_certificate(crit.anchors, cfg.anchors.method, crit.metric, crit.scale_value()).to_dict())
        if isinstance(cfg.loss.scale, str):
            reporter.message(f"loss.scale={cfg.loss.scale}: s = {crit.scale_value():.4f}, the scale whose loss floor is "
                             f"{cfg.loss.floor_target:g} nats" + ("; learned from there" if cfg.loss.scale == "learn" else ""))
    reporter.message(f"run folder: {run_dir}")
    for note in data.notes:
        reporter.message(note)
    reporter.message(f"data: {data.name}, {len(run.train_split)} train"
                     + (f" / {len(run.val_split)} validation" if run.val_split is not None else "")
                     + f" / {len(run.test_split)} test, {len(data.classes)} classes, input {data.input_shape}; "
                     f"device: {device}"
                     + (f"; DDP over {world} processes, {cfg.train.batch_size // world} images each per step"
                        if world > 1 else ""))
    warning = selection(run)[1]
    if warning:
        reporter.message(warning)


def _tensorboard(cfg: Config, run_dir: Path, rank: int, first_epoch: int):
    """The TensorBoard log of rank 0 when ``train.tensorboard`` is on, else None."""
    if not cfg.train.tensorboard or rank != 0:
        return None
    from ncmcli.runs.tblog import TensorBoard

    return TensorBoard(run_dir, first_epoch=first_epoch)


def _all_ranks(loss_sum, correct, seen, device):
    """An epoch's loss sum, correct count and images, summed over the DDP ranks."""
    totals = torch.tensor([loss_sum.item(), float(correct.item()), float(seen)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    return totals[0], totals[1].long(), int(totals[2].item())


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
        from ncmcli.runs.tblog import feature_diagnostics

        ev["feature_diagnostics"] = feature_diagnostics(clf.criterion, ev.pop("features"), ev.pop("labels"))
    val = None if run.val_split is None else evaluate(clf, run.val_split, **kw)
    return ev, val


def _epoch_metrics(run: Setup, epoch: int, train_loss: float, train_acc: float, ev: dict, val: dict | None, *,
                   lr: float, images_per_s: float, epoch_time: float) -> dict:
    """One metrics.jsonl line: losses and accuracies, balanced test accuracy (and, on
    long-tailed data, head/medium/tail), and an NCM loss's scale (moved only by learn)."""
    from ncmcli.scoring import imbalance_metrics

    metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": ev["loss"], "test_acc": ev["accuracy"], "test_error_pct": ev["error_pct"],
               "lr": lr, "epoch_time_s": round(epoch_time, 3), "images_per_s": images_per_s}
    tail = imbalance_metrics(ev["confusion"], run.data.train_counts if run.data.imbalance else None)
    metrics["test_balanced_acc"] = tail["balanced_accuracy"]
    if run.data.imbalance:
        metrics.update({f"test_{k}_acc": tail[f"{k}_accuracy"] for k in ("head", "medium", "tail")})
    if len(run.lineage.tasks) > 1:  # class-incremental: the accuracy on each run's classes
        from ncmcli.runs.incremental import task_accuracies

        metrics["test_tasks"] = task_accuracies(ev["confusion"], run.data.classes, run.lineage.tasks)
    if val is not None:
        metrics.update(val_loss=val["loss"], val_acc=val["accuracy"], val_error_pct=val["error_pct"])
    crit = evaluated(run).criterion
    if crit.uses_anchors:
        metrics["scale"] = crit.scale_value()
    return metrics


def _interrupt(stop: StopRequest, run_dir: Path, epoch: int, step: int) -> Interrupted:
    """The one exception both stop paths raise (mid-epoch, and after an epoch)."""
    where = f"at epoch {epoch}, step {step}" if step else f"after epoch {epoch}"
    return Interrupted(f"stopped by {stop.signal_name} {where}; resume with: ncm train --resume {run_dir}",
                       _signal_exit_code(stop.signal_name), run_dir=run_dir, epoch=epoch, step=step)


def train(cfg: Config, *, run_dir: Path, device: torch.device, reporter: ProgressReporter,
          preset: str | None = None, overrides: list[str] = (), resume=False,
          stop: StopRequest | None = None, extend: Path | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` and return the result record (also in result.json).

    ``resume`` (True, or that file's ``CheckpointFile`` already read) continues from
    ``run_dir/last.safetensors`` exactly where it stopped. On a
    ``stop`` request training stops at the next step boundary, saves a resumable ``last``
    checkpoint and raises ``Interrupted``. ``extend``: a checkpoint whose classes this run
    keeps and adds ``data.classes`` to (``ncmcli.runs.incremental``)."""
    from ncmcli.data.batching import batches

    t_start = time.time()
    rank, world = dist_info()
    if rank == 0:  # only the writing rank may touch the folder
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write (SIGKILL)
            stale.unlink(missing_ok=True)
    # -- Setup (data, model, criterion, optimiser, schedule), then resume or a new run's files
    parent = _parent(run_dir, resume, extend)
    run = build_run(cfg, device, reporter.message, parent=parent)
    model, criterion, optimizer, scheduler = run.model, run.criterion, run.optimizer, run.scheduler
    _open_run(cfg, run, run_dir, device, resume=resume, parent=parent, reporter=reporter)
    _announce(cfg, run, run_dir, device, reporter)
    progress, data = run.progress, run.data
    select_on = selection(run)[0]

    def save(name: str, epoch: int, metrics: dict, state: trainstate.TrainState | None = None) -> None:
        if rank != 0:  # only rank 0 writes files
            return
        # On CUDA the loss is checked every 25 steps only, and a stop can fall between checks:
        # weights are checked before every save, so NaN never reaches a checkpoint.
        where = f"epoch {epoch} ({name} not written; earlier checkpoints are untouched)"
        check_finite(model, criterion, where)
        clf = evaluated(run)  # the EMA when on
        if run.ema is not None:
            check_finite(clf.net, clf.criterion, where)
        checkpoint.save(run_dir / name, clf, config=cfg, epoch=epoch, metrics=metrics, extra=trainstate.pack(state) if state is not None else None, run_id=run.run_id,
                        class_counts=data.train_counts, imbalance=data.imbalance, lineage=run.lineage)

    def snapshot(epoch_rng: torch.Tensor) -> trainstate.TrainState:
        raw = {} if run.ema is None else {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"criterion.{k}": v for k, v in criterion.state_dict().items()}}
        return trainstate.TrainState(
            progress, optimizer.state_dict(), scheduler.state_dict() if scheduler is not None else None,
            epoch_rng, torch.get_rng_state(), gather_rng(torch.cuda.get_rng_state(device), device)
            if device.type == "cuda" else [], raw, run.scaler.state_dict() if run.scaler.is_enabled() else None)

    history = runfiles.read_metrics(run_dir / runfiles.METRICS, reporter.message) if resume else []
    tb = _tensorboard(cfg, run_dir, rank, progress.epoch + 1)
    every = cfg.train.log_every_steps  # host reads of the device totals: every this many steps
    for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
        # -- Train one epoch; loss, accuracy and the NaN guard accumulate on the device
        start_epoch(cfg, run, epoch)  # train mode; the backbone frozen for the first epochs, if asked
        epoch_rng = run.gen.get_state()  # a mid-epoch resume replays this epoch's order from here
        reporter.epoch_start(epoch, cfg.train.epochs, run.steps_per_epoch)
        skip = progress.step
        totals = DeviceTotals(progress, device)
        seen, seen0, t0 = progress.seen, progress.seen, time.time()
        for i, (x, y) in enumerate(batches(run.train_split, cfg.train.batch_size, mean=run.mean, std=run.std,
                                            device=device, generator=run.gen, augment_batches=cfg.data.augment,
                                            flip_batches=cfg.data.hflip, skip=skip, rank=rank, world=world),
                                   skip + 1):
            loss, feats = run.step(x, y)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            totals.add(loss, criterion.predict(feats.detach()), y)
            seen += len(y)
            read = totals.read() if i % every == 0 or i == run.steps_per_epoch else None  # the loop's one sync
            # -- NaN guard: read before the step, so bad weights never reach a checkpoint
            if read is not None and read[2] is not None:
                bad = read[2]
                raise TrainingDiverged(
                    f"the loss became NaN or infinite at epoch {epoch}, step {bad} (global step "
                    f"{progress.global_step + 1 - (i - bad)}); try a lower learning rate than optim.lr={cfg.optim.lr:g}. "
                    f"Checkpoints from earlier epochs in {run_dir} are untouched")
            run.warmup.step(progress.global_step, lambda: run.scaler.step(optimizer))
            run.scaler.update()
            update_ema(run)
            if run.per_step:
                scheduler.step()
            progress.global_step += 1
            reporter.step(i, read[0] / seen if read else None, read[1] / seen if read else None,
                          (seen - seen0) / max(time.time() - t0, 1e-9))  # loss and accuracy as last read
            # -- Stop request (a signal): save a resumable checkpoint at this boundary
            if _stop_requested(stop, i, every, world) and i < run.steps_per_epoch:
                progress.step, progress.loss_sum, progress.correct = i, totals.loss_sum.item(), int(totals.correct.item())
                progress.seen = seen
                progress.train_time += time.time() - t0
                save(runfiles.LAST, epoch - 1, {"interrupted_at_step": i}, snapshot(epoch_rng))
                raise _interrupt(stop, run_dir, epoch, i)
        loss_sum, correct = totals.close()
        epoch_time = time.time() - t0
        if world > 1:  # epoch totals over all ranks
            loss_sum, correct, seen = _all_ranks(loss_sum, correct, seen, device)
        progress.train_time += epoch_time
        progress.train_images += seen - seen0
        train_loss = loss_sum.item() / seen
        # -- Evaluate on the test (and validation) split
        ev, val = _evaluate_epoch(cfg, run, device, keep_outputs=tb is not None)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, PlateauOnExcess):
            if criterion.uses_anchors and criterion.learn_scale:
                scheduler.floor = criterion.loss_floor()  # a learned scale moves the floor
            scheduler.step(train_loss)
        elif scheduler is not None and not run.per_step:
            scheduler.step()  # multistep counted in epochs
        metrics = _epoch_metrics(run, epoch, train_loss, correct.item() / seen, ev, val, lr=lr,
                                 images_per_s=round(seen / max(epoch_time, 1e-9), 1), epoch_time=epoch_time)
        history.append(metrics)
        # -- Checkpoint: best on validation accuracy when there is a validation split, else on
        # test accuracy (result.json says which); last (resumable) every epoch; one metrics line
        progress.epoch, progress.step, progress.loss_sum, progress.correct, progress.seen = epoch, 0, 0.0, 0, 0
        if progress.best is None or metrics[select_on] > progress.best[select_on]:
            progress.best = metrics
            save(runfiles.BEST, epoch, metrics)
        save(runfiles.LAST, epoch, metrics, snapshot(run.gen.get_state()))
        if rank == 0:
            runfiles.append_metrics(run_dir / runfiles.METRICS, metrics)
        reporter.epoch_end(metrics)
        if tb is not None:
            tb.epoch(metrics, ev)
        if _stop_requested(stop, 0, 1, world) and epoch < cfg.train.epochs:
            raise _interrupt(stop, run_dir, epoch, 0)

    if tb is not None:
        tb.close()
    result = result_record(cfg, run, run_dir, history, device=device, preset=preset, overrides=overrides,
                           t_start=t_start)
    if rank == 0:
        RunDir(run_dir).write_result(result)
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
