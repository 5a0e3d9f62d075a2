"""A run's set-up: seeds, data, the classifier, the training step, optimiser and schedule,
built by ``build_run`` and returned as one plain ``Setup``; the step itself, EMA and the
finiteness check are in ``step``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ncmcli.config.schema import MAX_CLASSES, MAX_PARAMS, Config
from ncmcli.data import replay
from ncmcli.data.batching import Split, split_stats
from ncmcli.data.datasets import load_dataset
from ncmcli.data.loader import Loader
from ncmcli.errors import ConfigError as NcmConfigError
from ncmcli.errors import config_boundary
from ncmcli.nn.classifier import Classifier
from ncmcli.nn.models import backbone_parameters
from ncmcli.runs import trainstate
from ncmcli.runs.incremental import Lineage, check_compatible, check_input, extended_classifier, mixed_memory
from ncmcli.train.runtime import dist_info, rank0_first
from ncmcli.train.schedules import Warmup, make_optimizer, make_scheduler
from ncmcli.train.step import EMA, build_step


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
    loader: Loader  # the training split's batches, one epoch per call
    ema: nn.Module | None = None  # EMA of the classifier when train.ema_decay > 0
    progress: trainstate.Progress = field(default_factory=trainstate.Progress)
    run_id: str | None = None
    lineage: object = None  # incremental.Lineage: the tasks so far and an --extend run's parent
    memory: object = None  # replay.Memory this run keeps for later --extend runs (train.replay > 0)

    @property
    def model(self) -> nn.Module:
        return self.classifier.net

    def close(self) -> None:
        """Stop the DataLoader workers of folder splits read per batch (``FileSplit``): closed
        explicitly they stop at once, collected they each wait out a join timeout."""
        for split in (self.train_split, self.test_split, self.val_split):
            if hasattr(split, "close"):
                split.close()

    @property
    def criterion(self) -> nn.Module:
        return self.classifier.criterion

    @property
    def mean(self) -> list[float]:
        return self.classifier.mean

    @property
    def std(self) -> list[float]:
        return self.classifier.std


def _classifier(cfg: Config, data, parent) -> Classifier:
    """A new run's classifier with the training split's statistics (the paper's: global; ImageNet's
    for pretrained weights), or an --extend run's, grown from its parent with the parent's."""

    if parent is not None:
        return extended_classifier(cfg, parent, data.classes, data.train_counts)
    if cfg.model.pretrained:  # the statistics the pretrained weights were trained with
        mean, std = imagenet_stats(data.input_shape[0])
    else:
        mean, std = split_stats(data.train, normalization=cfg.data.normalization)
    with config_boundary():  # the library's ValueError for a config value is a config error here
        return Classifier.from_config(
            cfg, data.classes, data.input_shape, mean=mean, std=std, class_counts=data.train_counts
        )


def build_run(cfg: Config, device: torch.device, say=None, parent=None) -> Setup:
    """Seeds, threads, data, model, anchors, criterion, the speed settings, optimiser, schedule.
    ``parent``: the ``incremental.Parent`` an --extend run starts from."""

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        deterministic_setup(cfg, device.type, os.environ)
        torch.use_deterministic_algorithms(True)
    if parent is not None:
        check_compatible(cfg, parent)
    data = rank0_first(
        lambda: load_dataset(cfg.data, say=say, known_classes=parent.classes if parent else None)
    )
    lineage, memory = _lineage(cfg, data, parent)  # one download above, not one per rank
    classifier = _classifier(cfg, data, parent)
    model, criterion = classifier.parts()
    _check_size(model, criterion, len(data.classes))
    classifier.to(device)
    step, amp_dtype = build_step(cfg, model, criterion, device)
    train_split = data.train.to(device)
    rank, world = dist_info()
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation draws
    loader = Loader(
        train_split,
        cfg.train.batch_size,
        classifier.mean,
        classifier.std,
        device,
        gen,
        augment=cfg.data.augment,
        hflip=cfg.data.hflip,
        rank=rank,
        world=world,
    )
    steps_per_epoch = len(loader)
    optimizer = make_optimizer(cfg, model, criterion)
    scheduler, per_step = make_scheduler(cfg, optimizer, steps_per_epoch, floor=criterion.loss_floor())
    # The EMA averages both halves: a SoftMax model's classifier lives in its criterion.
    ema = EMA(classifier, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    return Setup(
        ema=ema,
        lineage=lineage,
        memory=memory,
        data=data,
        classifier=classifier,
        step=step,
        optimizer=optimizer,
        scheduler=scheduler,
        per_step=per_step,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        gen=gen,
        train_split=train_split,
        test_split=data.test.to(device),
        val_split=data.val.to(device) if data.val is not None else None,
        steps_per_epoch=steps_per_epoch,
        warmup=Warmup(optimizer, round(cfg.optim.warmup_epochs * steps_per_epoch)),
        loader=loader,
    )


def _lineage(cfg: Config, data, parent):
    """The run's task history, with the parent's replay memory mixed into ``data.train`` (an
    --extend run with train.replay), and the memory this run keeps (train.replay > 0)."""

    if cfg.train.replay and not isinstance(data.train, Split):
        raise NcmConfigError("train.replay needs the training split in memory (data.loader=tensor)")
    tasks = [list(data.classes)]
    from_parent = torch.zeros(len(data.train), dtype=torch.bool)
    mixed = None
    if parent is not None:
        check_input(parent, data.input_shape)
        tasks = [*parent.tasks, data.classes[len(parent.classes) :]]
        mixed = mixed_memory(cfg, parent, data.classes)
        if mixed is not None:  # rehearsal: the memory joins every epoch's shuffled batches
            data.train = Split(
                torch.cat([data.train.images, mixed.images]), torch.cat([data.train.labels, mixed.labels])
            )
            from_parent = torch.cat([from_parent, torch.ones(len(mixed.labels), dtype=torch.bool)])
            data.notes.append(
                f"replay: {len(mixed.labels)} images of {len(parent.classes)} earlier classes from "
                f"the parent's memory, mixed into every epoch"
            )
    lineage = Lineage(tasks, None if parent is None else {"path": str(parent.path), "sha256": parent.sha256})
    memory = None
    if cfg.train.replay:
        memory = replay.select(
            data.train, data.classes, cfg.train.replay, seed=cfg.seed, from_parent=from_parent
        )
        lineage.replay = {"mixed_in": None if mixed is None else mixed.selection, "kept": memory.selection}
    return lineage, memory


def _check_size(model: nn.Module, criterion: nn.Module, num_classes: int) -> None:
    """Refuse, before training, a model that checkpoint loading would refuse afterwards."""

    n = sum(t.numel() for m in (model, criterion) for t in m.state_dict().values())
    if n > MAX_PARAMS:
        raise NcmConfigError(
            f"the model has {n:,} parameters and buffers, above the {MAX_PARAMS:,} a checkpoint may "
            "hold; lower model.feature_dim or data.image_size"
        )
    if num_classes > MAX_CLASSES:
        raise NcmConfigError(f"{num_classes:,} classes is above the {MAX_CLASSES:,} a checkpoint may hold")


def deterministic_setup(cfg: Config, device_type: str, env) -> None:
    """What ``train.deterministic`` needs on CUDA: cuBLAS's fixed workspace (its GEMMs are
    otherwise nondeterministic, and torch raises at the first Linear), set in ``env`` before
    any CUDA work; and no op without a deterministic CUDA kernel, refused up front by name."""
    if device_type != "cuda":
        return
    if cfg.model.arch.startswith("resnet"):
        raise NcmConfigError(
            "train.deterministic on CUDA cannot train model.arch="
            + cfg.model.arch
            + ": adaptive_avg_pool2d's backward has no deterministic CUDA kernel"
        )
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


def evaluated(run: Setup) -> Classifier:
    """The classifier that is evaluated and checkpointed: the EMA when on."""
    return run.classifier if run.ema is None else run.ema.module
