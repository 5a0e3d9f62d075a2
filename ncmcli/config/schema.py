"""The run config's schema: one frozen, typed record per section, every key's default and
reason (the README's key table is generated from the comments here), the choices each key
allows (read from the registry where it names things) and the bounds training and checkpoint
loading share. Values are parsed in ``values``, invariants checked in ``checks``, and a
Config is built from dotted keys in ``overrides``; presets (YAML files) are in ``presets``.

No torch here, so that ``ncm --help``, ``ncm presets`` and config errors are instant."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ncmcli import registry  # torch-free: the names every check below reads
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
    # folder only: 1 or 3; 0 = from the images (1 when every sampled one is grayscale, else 3)
    channels: int = 0
    resize: str = "crop"  # folder and predict: keep the aspect ratio (shorter side, centre crop) or squash
    # folder only: square side in pixels; 0 = from the images (median shorter side, 8..64)
    image_size: int = 0
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
        return dataclasses.asdict(
            self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
        )


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
