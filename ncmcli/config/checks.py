"""The invariants a Config's types alone cannot express: one-of-these choices (read from the
schema's tuples, which read the registry; every miss gets the same "did you mean" from
``registry.suggest``), ranges, and the settings that only make sense together."""

from __future__ import annotations

import os

from ncmcli import registry
from ncmcli.config import schema as S
from ncmcli.config.schema import MAX_CLASSES, MAX_FEATURE_DIM, MAX_SCALE, MAX_SEED, Config, quote
from ncmcli.config.values import _betas_ok, _imbalance_ok, is_fixed_scale
from ncmcli.errors import ConfigError

# key -> the values it may take.
CHOICES = {
    "data.name": S.DATASETS,
    "data.resize": ("crop", "squash"),
    "data.normalization": S.NORMALIZATIONS,
    "data.loader": S.LOADERS,
    "model.arch": S.ARCH_NAMES,
    "model.head": S.HEADS,
    "loss.name": S.LOSSES,
    "loss.hinge_form": S.HINGE_FORMS,
    "loss.free_slots": S.FREE_SLOTS,
    "optim.name": S.OPTIMIZERS,
    "optim.schedule": S.SCHEDULES,
    "optim.milestone_unit": S.MILESTONE_UNITS,
    "train.precision": S.PRECISIONS,
    "train.channels_last": S.TRISTATE,
}


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def value_of(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check(cfg: Config) -> None:
    """Every invariant, in a fixed order: the first broken one is the error."""
    _check_choices(cfg)
    _check_model_and_seeds(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _check_loss(cfg)
    _check_data(cfg)


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = value_of(cfg, key)
        need(
            value in allowed,
            f"{key}: {quote(value)} is not one of {', '.join(allowed)}" + registry.suggest(value, allowed),
        )
    method = cfg.anchors.method
    need(
        method in S.ANCHOR_METHODS or method.endswith(registry.ANCHOR_FILE_SUFFIXES),
        f"anchors.method: {quote(method)} is not one of {', '.join(S.ANCHOR_METHODS)} or a .safetensors/.csv file"
        + registry.suggest(method, S.ANCHOR_METHODS),
    )
    need(
        cfg.loss.margin in registry.LSOFTMAX_MARGINS,
        f"loss.margin must be one of {', '.join(map(str, registry.LSOFTMAX_MARGINS))}, got {cfg.loss.margin}",
    )


def _check_model_and_seeds(cfg: Config) -> None:
    lo, hi = registry.DROPOUT_RANGE
    need(lo <= cfg.model.dropout < hi, f"model.dropout must be in [{lo:g}, {hi:g}), got {cfg.model.dropout}")
    need(
        0 <= cfg.model.feature_dim <= MAX_FEATURE_DIM,
        f"model.feature_dim must be in [0, {MAX_FEATURE_DIM}], got {cfg.model.feature_dim}",
    )
    need(0 <= cfg.seed <= MAX_SEED, f"seed must be in [0, 2^63 - 1], got {cfg.seed}")
    need(0 <= cfg.anchors.seed <= MAX_SEED, f"anchors.seed must be in [0, 2^63 - 1], got {cfg.anchors.seed}")
    need(
        0 <= cfg.data.subset_seed <= MAX_SEED - 1,
        f"data.subset_seed must be in [0, 2^63 - 2], got {cfg.data.subset_seed}",
    )
    need(
        0 <= cfg.anchors.slots <= MAX_CLASSES,
        f"anchors.slots must be in [0, {MAX_CLASSES}], got {cfg.anchors.slots}",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    need(t.epochs <= 1_000_000, f"train.epochs must be <= 1000000, got {t.epochs}")
    need(
        t.batch_size <= 2**20 and t.eval_batch_size <= 2**20,
        "train.batch_size and train.eval_batch_size must be <= 1048576",
    )
    need(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    cpus = os.cpu_count() or 1
    need(
        0 <= t.num_threads <= cpus,
        f"train.num_threads must be in [0, {cpus}] (this machine's CPUs), got {t.num_threads}",
    )
    need(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(
        1 <= t.log_every_steps <= 1_000_000,
        f"train.log_every_steps must be in [1, 1000000], got {t.log_every_steps}",
    )
    need(0 <= t.replay <= 10_000_000, f"train.replay must be in [0, 10000000] images, got {t.replay}")
    need(
        0 <= cfg.model.freeze_backbone_epochs < t.epochs or cfg.model.freeze_backbone_epochs == 0,
        f"model.freeze_backbone_epochs must be below train.epochs ({t.epochs}), got {cfg.model.freeze_backbone_epochs}",
    )


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0.0 <= o.momentum < 1.0, f"optim.momentum must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.patience >= 0, f"optim.patience must be >= 0, got {o.patience}")
    need(0.0 < o.lr_factor < 1.0, f"optim.lr_factor must be in (0, 1), got {o.lr_factor}")
    need(o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}")
    need(
        not o.nesterov or (o.name == "sgd" and o.momentum > 0),
        "optim.nesterov needs optim.name=sgd and optim.momentum > 0",
    )
    need(
        0 < o.backbone_lr_factor <= 1,
        f"optim.backbone_lr_factor must be in (0, 1], got {o.backbone_lr_factor}",
    )
    need(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    need(
        _betas_ok(o.betas),
        f"optim.betas must be two numbers in [0, 1) such as 0.9,0.999, got {quote(o.betas)}",
    )
    need(o.max_drops >= 0, f"optim.max_drops must be >= 0, got {o.max_drops}")
    need(0 <= o.threshold < 1, f"optim.threshold must be in [0, 1), got {o.threshold}")
    need(
        all(m >= 1 for m in o.milestones) and list(o.milestones) == sorted(set(o.milestones)),
        f"optim.milestones must be increasing positive integers, got {list(o.milestones)}",
    )
    need(
        o.schedule != "multistep" or o.milestones,
        "optim.schedule=multistep needs optim.milestones, e.g. --set optim.milestones=30,60",
    )


def _check_loss(cfg: Config) -> None:
    ls = cfg.loss
    need(0 <= ls.label_smoothing < 1, f"loss.label_smoothing must be in [0, 1), got {ls.label_smoothing}")
    need(
        ls.label_smoothing == 0 or ls.name in S.SMOOTHED_LOSSES,
        f"loss.label_smoothing applies to {', '.join(S.SMOOTHED_LOSSES)}, not {ls.name}",
    )
    need(
        not is_fixed_scale(ls.scale) or 0 < ls.scale <= MAX_SCALE,
        f"loss.scale must be in (0, {MAX_SCALE:g}], auto or learn, got {ls.scale}",
    )
    need(0 < ls.floor_target < 10, f"loss.floor_target must be in (0, 10) nats, got {ls.floor_target}")
    need(0 <= ls.logit_adjust <= 10, f"loss.logit_adjust must be in [0, 10], got {ls.logit_adjust}")
    need(
        ls.logit_adjust == 0 or ls.name in S.ADJUSTED_LOSSES,
        f"loss.logit_adjust applies to {', '.join(S.ADJUSTED_LOSSES)}, not {ls.name}",
    )
    need(
        ls.lambda_base >= 0 and ls.lambda_gamma >= 0 and ls.lambda_power >= 0 and ls.lambda_min >= 0,
        "loss.lambda_base/gamma/power/min must be >= 0",
    )
    need(ls.center_weight >= 0, f"loss.center_weight must be >= 0, got {ls.center_weight}")
    need(0 <= ls.center_alpha <= 1, f"loss.center_alpha must be in [0, 1], got {ls.center_alpha}")
    need(
        not (cfg.anchors.slots and ls.logit_adjust),
        "loss.logit_adjust does not combine with anchors.slots (free slots have no prior); set one of them to 0",
    )


def _check_data(cfg: Config) -> None:
    d = cfg.data
    need(d.channels in (0, 1, 3), f"data.channels must be 0, 1 or 3, got {d.channels}")
    need(
        d.image_size == 0 or 8 <= d.image_size <= 512,
        f"data.image_size must be 0 or in [8, 512], got {d.image_size}",
    )
    need(d.limit_train >= 0 and d.limit_test >= 0, "data.limit_train/limit_test must be >= 0")
    need(
        "/" not in d.test_dir and "\\" not in d.test_dir and d.test_dir not in ("..", "train"),
        f"data.test_dir must be a subfolder name of data.root such as val, got {quote(d.test_dir)}",
    )
    need(
        d.val_split >= 0 and (d.val_split < 1 or d.val_split.is_integer()),
        f"data.val_split must be a fraction in [0, 1) or a whole count of images, got {d.val_split:g}",
    )
    need(
        _imbalance_ok(d.imbalance),
        f"data.imbalance must be exp:IF or step:IF with IF in [1, 10000] (e.g. exp:100), "
        f"or empty, got {quote(d.imbalance)}",
    )
    need(
        d.loader != "dataloader" or d.name == "folder",
        "data.loader=dataloader applies to folder datasets; the built-in ones always fit in memory",
    )
    need(d.memory_budget_gb > 0, f"data.memory_budget_gb must be > 0, got {d.memory_budget_gb}")
    need(-1 <= d.workers <= 64, f"data.workers must be -1 (one per core) or in [0, 64], got {d.workers}")
