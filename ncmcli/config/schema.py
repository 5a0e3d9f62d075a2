"""The run config: one frozen, typed record per section, presets with ``base:``
inheritance, and strict ``--set key.sub=value`` overrides.

This module imports no torch, so that ``ncm --help``, ``ncm presets`` and config errors
are instant, and so that the schema can be tested without a framework.

This module is long because every key's type, default and reason, its coercion and its
invariants belong together: they are the schema. Presets (YAML files) are in ``presets``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any


from ncmcli import registry  # torch-free: the names every check below reads
from ncmcli.errors import ConfigError
from ncmcli.netspecs import ARCH_NAMES as _ARCH_NAMES

DATASETS = tuple(registry.DATASETS)
LOSSES = tuple(registry.LOSSES)
HINGE_FORMS = tuple(registry.HINGE_FORMS)
ANCHOR_METHODS = tuple(registry.ANCHOR_METHODS)
SCHEDULES = ("plateau", "multistep", "cosine", "none")
OPTIMIZERS = ("sgd", "adamw")
SMOOTHED_LOSSES = tuple(registry.loss_key_users("loss.label_smoothing"))  # softmax, lsoftmax, center
ADJUSTED_LOSSES = tuple(registry.loss_key_users("loss.logit_adjust"))  # softmax and the NCM losses
MILESTONE_UNITS = ("epoch", "step")
HEADS = registry.HEADS
NORMALIZATIONS = ("global", "channel")
LOADERS = ("auto", "tensor", "dataloader")
FREE_SLOTS = ("softmax", "masked")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRISTATE = ("auto", "true", "false")


@dataclass(frozen=True)
class DataConfig:
    name: str = "quickstart"  # one of DATASETS; quickstart ships inside the package
    root: str = ""  # "" = $NCM_DATA, else ~/.cache/ncm/data: one cache per user, not per run
    # true: pad 4 + random crop + h-flip, the paper's CIFAR-10+; randomresizedcrop: torchvision's
    # RandomResizedCrop (area 8-100%, ratio 3/4-4/3) + h-flip, what fine-tuning on photos uses.
    augment: bool | str = False
    hflip: bool = False  # random horizontal flips only (implied by augment): Liu et al.'s plain CIFAR-10
    normalization: str = "global"  # the paper's one mean and std over all pixels; channel = per RGB channel
    download: bool = True  # torchvision downloads into root; off = fail fast offline
    channels: int = 0  # folder only: 1 or 3; 0 = from the images (1 when every sampled one is grayscale, else 3)
    resize: str = "crop"  # folder and predict: keep the aspect ratio (shorter side, centre crop) or squash
    image_size: int = 0  # folder only: square side in pixels; 0 = from the images (median shorter side, 8..64)
    test_dir: str = ""  # folder only: the held-out subfolder; "" = test/, else val/ (what photo sets ship)
    extensions: str = ""  # folder only: comma-separated file endings to read; "" = torchvision ImageFolder's
    limit_train: int = 0  # a stratified sample of N training images (0 = all): quick checks
    limit_test: int = 0  # likewise for the test split
    subset_seed: int = 0  # the limits' sample: fixed across run seeds, so runs compare on the same images
    # Keep only these classes (comma-separated names or indices) in every split, relabelled in
    # their original order; "" = all. Applied before the limits: open-set splits, subsets.
    classes: str = ""
    # A long-tailed training split: exp:IF (Cao et al.'s exponential profile, largest class
    # IF times the smallest) or step:IF (half the classes IF times smaller); "" = as the data
    # came. Applied after limit_train, before val_split; the test split stays balanced.
    imbalance: str = ""
    # Held out of train (a fraction < 1, or a count), seeded by subset_seed and stratified;
    # when set, best.safetensors is selected on it instead of on the test split.
    val_split: float = 0.0
    cache: bool = True  # folder only: decode once into a safetensors cache keyed to the folder's contents
    loader: str = "auto"  # folder only: tensor (in memory), dataloader (decode per batch), auto = by budget
    memory_budget_gb: float = 4.0  # auto: hold a folder split in memory when its decoded uint8 fits in this
    # DataLoader worker processes for folders too large for memory; -1 = one per CPU core (at
    # most 16), shared among the DDP ranks on the machine.
    workers: int = -1


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mnist"  # a Table 1 net (mnist2d, mnist, cifar10, cifar100), a CPU-sized one, or a ResNet
    dropout: float = 0.1  # the paper's Table 2 setting; Table 3 sweeps 0..0.5
    feature_dim: int = 0  # 0 = the arch's d from Table 1
    pretrained: bool = False  # resnet*: torchvision's ImageNet weights (downloaded when online)
    # The feature FC: linear (features can reach anchors with negative coordinates), or
    # linear-bn-relu, Liu et al.'s ip1 -> BN -> ReLU that their L-Softmax/Hinge models use.
    head: str = "linear"
    # Fine-tuning: train only the feature FC (and the criterion) for this many epochs first, so
    # that a fresh head does not wreck pretrained features; 0 = train everything from the start.
    freeze_backbone_epochs: int = 0


@dataclass(frozen=True)
class AnchorsConfig:
    method: str = "orthogonal"  # the paper's default: the C standard basis vectors (d >= C)
    seed: int = 0  # only the random and optimized methods draw random numbers
    # How many anchors to build: 0 = one per class. More pre-allocates anchors for classes to
    # come (`ncm train --extend`): the unused ones wait in the geometry, and old ones never move.
    slots: int = 0


@dataclass(frozen=True)
class LossConfig:
    name: str = "encm"  # the paper's main method; softmax is the baseline
    # Inverse temperature s on -M: a number (1.0 is the paper; anything else an extension),
    # auto = the s at which the loss floor equals floor_target (at s = 1 the floor is 1.159
    # nats for 10 orthonormal anchors: the softmax stays nearly flat), or learn = a learned
    # log s that starts at the auto value.
    scale: float | str = 1.0
    # auto/learn: the floor, in nats, that auto's s leaves. 0.1 puts the best reachable
    # probability of the true class at e^-0.1 = 0.905 (the scale study in REPRODUCTION.md).
    floor_target: float = 0.1
    # Menon et al.'s logit-adjusted loss: tau * log(prior_c) is added to every training logit
    # (the prior from the training class counts); 0 = off, the paper's plain loss.
    logit_adjust: float = 0.0
    # Anchors no class uses yet (anchors.slots): softmax = they stay in the softmax's
    # denominator, so features learn to avoid them from the start (Pernici et al., 2020);
    # masked = the loss sees only the classes in use.
    free_slots: str = "softmax"
    hinge_form: str = "ova"  # Caffe's one-vs-all L1 HingeLoss, what the cited Hinge rows used
    margin: int = 2  # L-Softmax m in {1, 2, 3, 4}
    # L-Softmax lambda = max(lambda_min, base * (1 + gamma * iter)^-power): the released
    # Caffe models' annealing; a large lambda early is what lets L-Softmax train at all.
    lambda_base: float = 1000.0
    # Defaults: the released CIFAR-10 m=2 model (MNIST: 2.5e-5, 35; CIFAR-10+: 1e-5, 45).
    lambda_gamma: float = 2e-5
    lambda_power: float = 45.0  # L-Softmax: the annealing's power (see lambda_base)
    lambda_min: float = 0.0  # L-Softmax: the floor lambda anneals to (0 = the pure margin loss)
    center_weight: float = 0.003  # center loss lambda: Wen et al.'s main setting
    center_alpha: float = 0.5  # center loss centre learning rate: Wen et al.'s setting
    label_smoothing: float = 0.0  # softmax, center, lsoftmax: not part of the paper (0 = off)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 90  # the paper trains for about 90 epochs
    batch_size: int = 256  # the paper's batch size
    eval_batch_size: int = 1024  # evaluation needs no gradients, so larger batches are free
    num_threads: int = 0  # torch CPU threads; 0 = torch's default (all cores)
    deterministic: bool = False  # torch.use_deterministic_algorithms; slower on GPU
    precision: str = "auto"  # auto = bf16 autocast on CUDA that has it, fp32 elsewhere (CPU bf16 is slow)
    channels_last: str = "auto"  # auto = on CUDA (tensor-core friendly), off on CPU where it is slower
    # The step loop reads its running loss, accuracy and NaN guard from the device every this
    # many steps (and at each epoch's end), the same on every device: no host sync in between.
    log_every_steps: int = 25
    compile: bool = False  # torch.compile the net: faster steps on GPU after a warm-up of minutes
    # An exponential moving average of the weights (torch.optim.swa_utils), evaluated and
    # checkpointed as the model when on; 0 = off, the paper's setting. Typical: 0.999.
    ema_decay: float = 0.0
    # Class-incremental rehearsal: keep a seeded, class-balanced memory of at most N training
    # images (RUN_DIR/replay.safetensors) for later `--extend` runs, and mix the parent's
    # memory into every epoch of an --extend run; 0 = no memory (plain fine-tuning).
    replay: int = 0
    tensorboard: bool = False  # scalars into RUN_DIR/tensorboard (pip install 'ncmcli[tensorboard]')


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # the paper's SGD; adamw is an extension (decoupled weight decay)
    lr: float = 0.1  # the paper's initial learning rate
    momentum: float = 0.9  # the paper's SGD momentum
    weight_decay: float = 5e-4  # the paper's weight decay
    nesterov: bool = False  # sgd: Nesterov momentum; not part of the paper
    # The backbone's lr as a fraction of optim.lr (the feature FC and criterion keep optim.lr):
    # below 1 for pretrained backbones, which need smaller steps than a fresh head; 1 = the paper.
    backbone_lr_factor: float = 1.0
    betas: str = "0.9,0.999"  # adamw: (beta1, beta2)
    warmup_epochs: float = 0.0  # a linear ramp of the lr over this many epochs, in front of any schedule
    schedule: str = "plateau"  # the paper divides lr by 10 when the training loss plateaus
    # plateau: the improvement is measured on the training loss's excess over the
    # criterion's floor (NCM losses cannot reach 0), so every loss is cut by the same rule.
    patience: int = 5  # plateau: epochs without a `threshold` relative drop of the excess before a cut
    threshold: float = 0.01  # plateau: the relative drop of the excess that counts as progress
    max_drops: int = 3  # plateau: at most this many cuts (0.1 -> 1e-4), then the lr stays
    lr_factor: float = 0.1  # plateau and multistep: the paper's divide-by-10
    min_lr: float = 0.0  # plateau: never cut below this (0 = only max_drops limits the cuts)
    milestones: tuple[int, ...] = ()  # multistep: cut by lr_factor at each of these
    milestone_unit: str = "epoch"  # multistep: milestones count epochs, or steps (Liu et al.'s iterations)


@dataclass(frozen=True)
class Config:
    seed: int = 0  # seeds init, data order and augmentation
    description: str = ""  # one line shown by `ncm presets`
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    anchors: AnchorsConfig = field(default_factory=AnchorsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        # Lists, not tuples: YAML's safe dumper and JSON both take lists.
        return dataclasses.asdict(self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in items})


# ---------------------------------------------------------------------------------------
# Schema: every dotted key with its type.

def _schema(cls: type = Config, prefix: str = "") -> dict[str, type]:
    out: dict[str, type] = {}
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            out.update(_schema(typ, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = typ
    return out


SCHEMA: dict[str, type] = _schema()
MAX_SEED = 2**63 - 1
ARCH_NAMES = tuple(_ARCH_NAMES)
# Bounds that training and checkpoint loading share (ncmcli.runs.checkpoint imports these), so
# that whatever `ncm train` accepts, `eval`, `predict`, `export` and `--resume` load too.
MAX_FEATURE_DIM = 65536
MAX_SCALE = 1e4  # beyond this exp(-s d) underflows float32 for any distance above 0.01
MAX_CLASSES = 100_000
MAX_PARAMS = 2**28  # 1 GiB of float32: checked when the net is built, and before loading one


def quote(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters: an error message never echoes a
    580 MB value back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key[:200], list(SCHEMA), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key {quote(key)}{hint}")


def coerce(key: str, value: Any) -> Any:
    """``value`` (from YAML or from the command line) as the type of ``key``, or an error.

    PyYAML (YAML 1.1) reads ``1e-3`` as a string and ``no`` as a boolean, so strings are
    parsed against the schema here, and a boolean where a string belongs is refused with a
    hint to quote it rather than silently turned into 'False'."""
    if key not in SCHEMA:
        raise _unknown(key)
    typ = SCHEMA[key]
    if typing.get_origin(typ) is tuple:
        return _coerce_int_list(key, value)
    if key == "loss.scale":
        return _coerce_scale(key, value)
    if key == "data.augment":
        if isinstance(value, str) and value.strip().lower() == "randomresizedcrop":
            return "randomresizedcrop"
        try:
            return _coerce_as(key, value, bool)
        except ConfigError:
            raise ConfigError(f"{key}: expected bool (true or false) or randomresizedcrop, got {quote(value)}") from None
    return _coerce_as(key, value, typ)


def _coerce_as(key: str, value: Any, typ: type) -> Any:
    bad = ConfigError(f"{key}: expected {typ.__name__}, got {quote(value)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    as_float = float(value.strip())
                except ValueError:
                    raise bad from None
                if as_float.is_integer() and abs(as_float) < 2**53:
                    return int(as_float)
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: must be a finite number, got {quote(value)}")
        return out
    if typ is str:
        if isinstance(value, bool):
            raise ConfigError(
                f"{key}: expected a string, got the boolean {str(value).lower()} "
                f"(YAML reads yes/no/on/off as booleans: quote the value)"
            )
        if isinstance(value, (int, float, str)):
            return str(value)
        raise bad
    raise bad  # pragma: no cover - the schema only holds the four types above


SCALE_WORDS = ("auto", "learn")


def _coerce_scale(key: str, value: Any) -> float | str:
    """``loss.scale``: a positive number, or one of SCALE_WORDS."""
    if isinstance(value, str) and value.strip().lower() in SCALE_WORDS:
        return value.strip().lower()
    try:
        return _coerce_as(key, value, float)
    except ConfigError:
        raise ConfigError(f"{key}: expected a number > 0, auto or learn, got {quote(value)}") from None


def is_fixed_scale(scale: float | str) -> bool:
    return not isinstance(scale, str)


def _coerce_int_list(key: str, value: Any) -> tuple[int, ...]:
    """A list of integers from YAML (``[5000, 7500]``) or the command line (``5000,7500``,
    ``[5000,7500]``, or empty for none)."""
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        value = [part for part in text.split(",") if part.strip()] if text else []
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of integers such as 30,60, got {quote(value)}")
    return tuple(_coerce_as(key, v, int) for v in value)


def parse_betas(text: str) -> tuple[float, float]:
    b1, b2 = (float(v) for v in text.strip("()[] ").split(","))
    return b1, b2


def _betas_ok(text: str) -> bool:
    try:
        return all(0 <= b < 1 for b in parse_betas(text))
    except ValueError:
        return False


IMBALANCE_KINDS = ("exp", "step")


def _imbalance_ok(text: str) -> bool:
    if text == "":
        return True
    kind, sep, factor = text.partition(":")
    try:
        return kind in IMBALANCE_KINDS and bool(sep) and 1 <= float(factor) <= 10000
    except ValueError:
        return False


def _check(cfg: Config) -> None:
    """Invariants that types alone cannot express."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.data.name in DATASETS, f"data.name: {quote(cfg.data.name)} is not one of {', '.join(DATASETS)}"
         + registry.suggest(cfg.data.name, DATASETS))
    need(cfg.loss.name in LOSSES, f"loss.name: {quote(cfg.loss.name)} is not one of {', '.join(LOSSES)}"
         + registry.suggest(cfg.loss.name, LOSSES))
    need(
        cfg.anchors.method in ANCHOR_METHODS or cfg.anchors.method.endswith(registry.ANCHOR_FILE_SUFFIXES),
        f"anchors.method: {quote(cfg.anchors.method)} is not one of {', '.join(ANCHOR_METHODS)} "
        f"or a .safetensors/.csv file",
    )
    need(cfg.optim.schedule in SCHEDULES, f"optim.schedule: {quote(cfg.optim.schedule)} is not one of {', '.join(SCHEDULES)}")
    lo, hi = registry.DROPOUT_RANGE
    need(lo <= cfg.model.dropout < hi, f"model.dropout must be in [{lo:g}, {hi:g}), got {cfg.model.dropout}")
    need(0 <= cfg.model.feature_dim <= MAX_FEATURE_DIM,
         f"model.feature_dim must be in [0, {MAX_FEATURE_DIM}], got {cfg.model.feature_dim}")
    need(cfg.model.arch in ARCH_NAMES, f"model.arch: {quote(cfg.model.arch)} is not one of {', '.join(ARCH_NAMES)}")
    need(0 <= cfg.seed <= MAX_SEED, f"seed must be in [0, 2^63 - 1], got {cfg.seed}")
    need(0 <= cfg.anchors.seed <= MAX_SEED, f"anchors.seed must be in [0, 2^63 - 1], got {cfg.anchors.seed}")
    need(0 <= cfg.data.subset_seed <= MAX_SEED - 1, f"data.subset_seed must be in [0, 2^63 - 2], got {cfg.data.subset_seed}")
    need(cfg.train.epochs <= 1_000_000, f"train.epochs must be <= 1000000, got {cfg.train.epochs}")
    need(cfg.train.batch_size <= 2**20 and cfg.train.eval_batch_size <= 2**20,
         "train.batch_size and train.eval_batch_size must be <= 1048576")
    need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    need(cfg.train.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    need(cfg.train.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {cfg.train.eval_batch_size}")
    cpus = os.cpu_count() or 1
    need(0 <= cfg.train.num_threads <= cpus,
         f"train.num_threads must be in [0, {cpus}] (this machine's CPUs), got {cfg.train.num_threads}")
    need(cfg.train.precision in PRECISIONS, f"train.precision: {quote(cfg.train.precision)} is not one of {', '.join(PRECISIONS)}")
    need(cfg.train.channels_last in TRISTATE, f"train.channels_last: {quote(cfg.train.channels_last)} is not one of {', '.join(TRISTATE)}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(0.0 <= cfg.optim.momentum < 1.0, f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    need(cfg.optim.patience >= 0, f"optim.patience must be >= 0, got {cfg.optim.patience}")
    need(0.0 < cfg.optim.lr_factor < 1.0, f"optim.lr_factor must be in (0, 1), got {cfg.optim.lr_factor}")
    need(cfg.optim.min_lr >= 0, f"optim.min_lr must be >= 0, got {cfg.optim.min_lr}")
    need(0 <= cfg.train.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    need(cfg.optim.name in OPTIMIZERS, f"optim.name: {quote(cfg.optim.name)} is not one of {', '.join(OPTIMIZERS)}")
    need(not cfg.optim.nesterov or (cfg.optim.name == "sgd" and cfg.optim.momentum > 0),
         "optim.nesterov needs optim.name=sgd and optim.momentum > 0")
    need(0 < cfg.optim.backbone_lr_factor <= 1, f"optim.backbone_lr_factor must be in (0, 1], got {cfg.optim.backbone_lr_factor}")
    need(0 <= cfg.model.freeze_backbone_epochs < cfg.train.epochs or cfg.model.freeze_backbone_epochs == 0,
         f"model.freeze_backbone_epochs must be below train.epochs ({cfg.train.epochs}), got {cfg.model.freeze_backbone_epochs}")
    need(cfg.optim.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    need(_betas_ok(cfg.optim.betas), f"optim.betas must be two numbers in [0, 1) such as 0.9,0.999, got {quote(cfg.optim.betas)}")
    need(0 <= cfg.loss.label_smoothing < 1, f"loss.label_smoothing must be in [0, 1), got {cfg.loss.label_smoothing}")
    need(cfg.loss.label_smoothing == 0 or cfg.loss.name in SMOOTHED_LOSSES,
         f"loss.label_smoothing applies to {', '.join(SMOOTHED_LOSSES)}, not {cfg.loss.name}")
    need(cfg.optim.max_drops >= 0, f"optim.max_drops must be >= 0, got {cfg.optim.max_drops}")
    need(0 <= cfg.optim.threshold < 1, f"optim.threshold must be in [0, 1), got {cfg.optim.threshold}")
    need(cfg.optim.milestone_unit in MILESTONE_UNITS,
         f"optim.milestone_unit: {quote(cfg.optim.milestone_unit)} is not one of {', '.join(MILESTONE_UNITS)}")
    need(all(m >= 1 for m in cfg.optim.milestones) and list(cfg.optim.milestones) == sorted(set(cfg.optim.milestones)),
         f"optim.milestones must be increasing positive integers, got {list(cfg.optim.milestones)}")
    need(cfg.optim.schedule != "multistep" or cfg.optim.milestones,
         "optim.schedule=multistep needs optim.milestones, e.g. --set optim.milestones=30,60")
    need(cfg.model.head in HEADS, f"model.head: {quote(cfg.model.head)} is not one of {', '.join(HEADS)}")
    need(cfg.data.resize in ("crop", "squash"), f"data.resize: {quote(cfg.data.resize)} is not one of crop, squash")
    need(cfg.data.normalization in NORMALIZATIONS,
         f"data.normalization: {quote(cfg.data.normalization)} is not one of {', '.join(NORMALIZATIONS)}")
    need(not is_fixed_scale(cfg.loss.scale) or 0 < cfg.loss.scale <= MAX_SCALE,
         f"loss.scale must be in (0, {MAX_SCALE:g}], auto or learn, got {cfg.loss.scale}")
    need(0 < cfg.loss.floor_target < 10, f"loss.floor_target must be in (0, 10) nats, got {cfg.loss.floor_target}")
    need(0 <= cfg.loss.logit_adjust <= 10, f"loss.logit_adjust must be in [0, 10], got {cfg.loss.logit_adjust}")
    need(cfg.loss.logit_adjust == 0 or cfg.loss.name in ADJUSTED_LOSSES,
         f"loss.logit_adjust applies to {', '.join(ADJUSTED_LOSSES)}, not {cfg.loss.name}")
    need(cfg.loss.hinge_form in HINGE_FORMS, f"loss.hinge_form: {quote(cfg.loss.hinge_form)} is not one of {', '.join(HINGE_FORMS)}")
    need(cfg.loss.margin in registry.LSOFTMAX_MARGINS,
         f"loss.margin must be one of {', '.join(map(str, registry.LSOFTMAX_MARGINS))}, got {cfg.loss.margin}")
    need(cfg.loss.lambda_base >= 0 and cfg.loss.lambda_gamma >= 0 and cfg.loss.lambda_power >= 0
         and cfg.loss.lambda_min >= 0, "loss.lambda_base/gamma/power/min must be >= 0")
    need(cfg.loss.center_weight >= 0, f"loss.center_weight must be >= 0, got {cfg.loss.center_weight}")
    need(0 <= cfg.loss.center_alpha <= 1, f"loss.center_alpha must be in [0, 1], got {cfg.loss.center_alpha}")
    need(0 <= cfg.anchors.slots <= MAX_CLASSES, f"anchors.slots must be in [0, {MAX_CLASSES}], got {cfg.anchors.slots}")
    need(cfg.loss.free_slots in FREE_SLOTS,
         f"loss.free_slots: {quote(cfg.loss.free_slots)} is not one of {', '.join(FREE_SLOTS)}")
    need(not (cfg.anchors.slots and cfg.loss.logit_adjust),
         "loss.logit_adjust does not combine with anchors.slots (free slots have no prior); set one of them to 0")
    need(1 <= cfg.train.log_every_steps <= 1_000_000,
         f"train.log_every_steps must be in [1, 1000000], got {cfg.train.log_every_steps}")
    need(0 <= cfg.train.replay <= 10_000_000, f"train.replay must be in [0, 10000000] images, got {cfg.train.replay}")
    need(cfg.data.channels in (0, 1, 3), f"data.channels must be 0, 1 or 3, got {cfg.data.channels}")
    need(cfg.data.image_size == 0 or 8 <= cfg.data.image_size <= 512,
         f"data.image_size must be 0 or in [8, 512], got {cfg.data.image_size}")
    need(cfg.data.limit_train >= 0 and cfg.data.limit_test >= 0, "data.limit_train/limit_test must be >= 0")
    need("/" not in cfg.data.test_dir and "\\" not in cfg.data.test_dir and cfg.data.test_dir not in ("..", "train"),
         f"data.test_dir must be a subfolder name of data.root such as val, got {quote(cfg.data.test_dir)}")
    need(cfg.data.val_split >= 0 and (cfg.data.val_split < 1 or cfg.data.val_split.is_integer()),
         f"data.val_split must be a fraction in [0, 1) or a whole count of images, got {cfg.data.val_split:g}")
    need(_imbalance_ok(cfg.data.imbalance),
         f"data.imbalance must be exp:IF or step:IF with IF in [1, 10000] (e.g. exp:100), or empty, "
         f"got {quote(cfg.data.imbalance)}")
    need(cfg.data.loader in LOADERS, f"data.loader: {quote(cfg.data.loader)} is not one of {', '.join(LOADERS)}")
    need(cfg.data.loader != "dataloader" or cfg.data.name == "folder",
         "data.loader=dataloader applies to folder datasets; the built-in ones always fit in memory")
    need(cfg.data.memory_budget_gb > 0, f"data.memory_budget_gb must be > 0, got {cfg.data.memory_budget_gb}")
    need(-1 <= cfg.data.workers <= 64, f"data.workers must be -1 (one per core) or in [0, 64], got {cfg.data.workers}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {quote(tree)}")
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v and key not in SCHEMA:
                out.update(_flatten(v, key + "."))
            elif key in SCHEMA:
                raise ConfigError(f"{key}: expected {getattr(SCHEMA[key], '__name__', 'a list')}, got a mapping")
            # an empty mapping (e.g. 'loss:' with nothing under it) sets nothing
        else:
            out[key] = v
    return out


def dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config tree as {"section.key": value}, without validation (for reading runs)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(values: dict[str, Any]) -> Config:
    """A validated Config from flat dotted keys (unknown keys and bad values are errors)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, raw in values.items():
        val = coerce(key, raw)
        if "." in key:
            sec, sub = key.split(".", 1)
            sections.setdefault(sec, {})[sub] = val
        else:
            top[key] = val
    kwargs = dict(top)
    for f in dataclasses.fields(Config):
        if f.name in sections:
            kwargs[f.name] = f.default_factory()  # type: ignore[misc]
            kwargs[f.name] = dataclasses.replace(kwargs[f.name], **sections[f.name])
    cfg = Config(**kwargs)
    _check(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=0.05' -> ('optim.lr', '0.05'); the value is coerced later, against the schema."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} must look like key.sub=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if key not in SCHEMA:
        raise _unknown(key)
    return key, value


def from_dict(tree: dict) -> Config:
    """A Config from a nested dict, e.g. one stored in a checkpoint."""
    return build(_flatten(tree))


def to_yaml(cfg: Config) -> str:
    import yaml  # here, not at the top: the library (checkpoint loading) never needs it

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
